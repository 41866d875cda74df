"""``python -m train``: train a stream model and write its adapter folder.

    python -m train --out runs/demo                  # the shipped recipe (resumes if interrupted)
    python -m train --out runs/demo --steps 300 --rank 16
    python -m train --out runs/demo --ship           # and copy the adapter to the shipped folder

Run it under ``nice -n 10`` on a shared machine; rerunning the same command resumes.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning workers on a shared machine burn the time slices the
# other process needs (measured here: a 42 s step against 15 s with passive waiting).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from train.loop import RENDERINGS, TrainConfig, train  # noqa: E402
from train.tasks import FAMILIES  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = TrainConfig(base="", out="")
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base", default="default", help="Llama-family HF folder, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.json, adapter/")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch, help="examples per step and rendering")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--num-channels", type=int, default=d.num_channels, help="User, Output and C-2 thinking channels"
    )
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=d.alpha, help="LoRA alpha")
    p.add_argument(
        "--speak-weight", type=float, default=d.speak_weight, help="loss weight of non-silence targets"
    )
    p.add_argument("--renderings", default=",".join(d.renderings), help=f"comma list of {RENDERINGS}")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {FAMILIES}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--held-out", type=int, default=d.held_out, help="held-out examples never trained on")
    p.add_argument("--ship", action="store_true", help="copy the adapter to backend/adapters/streams-demo")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from backend.model_store import SHIPPED_ADAPTERS, resolve_model_dir
    from backend.tokenizer import Tokenizer
    from train.export import export_adapter
    from train.render import Renderer

    args = parse_args(argv)
    base = resolve_model_dir(args.base)
    cfg = TrainConfig(
        base=str(base),
        out=args.out,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        num_channels=args.num_channels,
        rank=args.rank,
        alpha=args.alpha,
        speak_weight=args.speak_weight,
        renderings=tuple(x for x in args.renderings.split(",") if x),
        families=tuple(x for x in args.families.split(",") if x),
        threads=args.threads,
        bf16=not args.fp32,
        save_every=args.save_every,
        held_out=args.held_out,
    )
    model = train(cfg, progress=not args.quiet)
    silence = Renderer(Tokenizer.from_dir(base), cfg.num_channels).silence
    info = {
        "base_model": base.name,
        "families": list(cfg.families),
        "renderings": list(cfg.renderings),
        "steps": cfg.steps,
        "batch": cfg.batch,
        "seed": cfg.seed,
        "lora_rank": cfg.rank,
        "speak_weight": cfg.speak_weight,
        "train_seconds": round(sum(x["seconds"] for x in cfg.log), 1),
        "final_loss": cfg.log[-1] if cfg.log else None,
    }
    adapter = export_adapter(model, Path(args.out) / "adapter", silence, info)
    print(json.dumps({"adapter": str(adapter), **info}, indent=2))
    if args.ship:
        dest = SHIPPED_ADAPTERS["streams-demo"]
        dest.mkdir(parents=True, exist_ok=True)
        for f in adapter.iterdir():
            shutil.copyfile(f, dest / f.name)
        print(f"shipped to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
