"""The training loop: fixed seed, progress bar, resumable checkpoints, the adapter at the end.

Resuming is exact: example ``i`` of the data is a pure function of ``(seed, i)``
(``train.tasks.training_example``) and the checkpoint holds the trainable weights, the
optimizer's moments and the step, so an interrupted run continues with the very batches it
would have seen. Checkpoints are written to a temporary file and renamed, so a kill while
saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from backend.tokenizer import Tokenizer
from train.model import LoraSettings, StreamModel
from train.render import IGNORE, NUM_CHANNELS, Renderer, collate
from train.tasks import FAMILIES, held_out, training_example

RENDERINGS = ("grid", "sequential")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    base: str
    out: str
    steps: int = 300
    #: Examples per step for each rendering in ``renderings``.
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 10
    seed: int = 0
    num_channels: int = NUM_CHANNELS
    rank: int = 8
    alpha: int = 16
    renderings: tuple[str, ...] = RENDERINGS
    #: Weight of a target that is not silence. A grid's targets are 65% silence, and
    #: Output's answer is one labelled cell in 27: at weight 1 the model learns to stay silent
    #: long before it learns to answer (measured: no answer at all after 50 steps).
    speak_weight: float = 4.0
    families: tuple[str, ...] = FAMILIES
    threads: int = 0
    bf16: bool = True
    save_every: int = 10
    held_out: int = 200
    log: list[dict] = field(default_factory=list)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batch_for(cfg: TrainConfig, renderer: Renderer, exclude: set[str], step: int, rendering: str) -> dict:
    """The batch of ``rendering`` at ``step``; both renderings of a step show the same examples."""
    start = step * cfg.batch
    examples = [training_example(cfg.seed, start + i, exclude, cfg.families) for i in range(cfg.batch)]
    items = [renderer.grid(e) if rendering == "grid" else renderer.sequential(e) for e in examples]
    batch = collate(items, renderer.eos)
    speaks = (batch["labels"] != renderer.silence) & (batch["labels"] != IGNORE)
    batch["weights"] = torch.where(speaks, cfg.speak_weight, 1.0)
    return batch


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, progress: bool = True) -> StreamModel:
    """Trains (or resumes) into ``cfg.out``; returns the model. ``cfg.out/checkpoint.pt`` is
    the resumable state, ``cfg.out/adapter/`` (``train.export``) the result."""
    from tqdm.auto import tqdm

    for r in cfg.renderings:
        if r not in RENDERINGS:
            raise ValueError(f"renderings: each must be one of {RENDERINGS}, got {r!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.from_dir(Path(cfg.base))
    renderer = Renderer(tokenizer, cfg.num_channels)
    model = StreamModel.from_dir(cfg.base, cfg.num_channels, LoraSettings(cfg.rank, cfg.alpha))
    params = model.trainable()
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    exclude = {e.text for e in held_out(cfg.held_out)}

    step = 0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        free = ("out", "steps", "log", "threads", "save_every")  # may change between runs
        saved = {k: v for k, v in state["config"].items() if k not in free}
        now = {k: v for k, v in asdict(cfg).items() if k in saved}
        if {k: list(v) if isinstance(v, tuple) else v for k, v in now.items()} != saved:
            raise ValueError(
                f"{ckpt}: saved with other settings {saved}; use another --out or the same flags"
            )
        missing = set(params) - set(state["trainable"])
        loaded = model.load_state_dict(state["trainable"], strict=False)
        if missing or loaded.unexpected_keys:
            raise ValueError(f"{ckpt}: does not match the model ({sorted(missing)[:3]} missing)")
        opt.load_state_dict(state["optimizer"])
        step, cfg.log = state["step"], state["log"]

    def checkpoint() -> None:
        trainable = {k: v.detach().clone() for k, v in model.state_dict().items() if k in params}
        cfg_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
        _save(
            ckpt,
            {
                "trainable": trainable,
                "optimizer": opt.state_dict(),
                "step": step,
                "log": cfg.log,
                "config": cfg_dict,
            },
        )

    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        losses = {}
        for rendering in cfg.renderings:
            batch = batch_for(cfg, renderer, exclude, step, rendering)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, _ = model.loss(batch)
            (loss / len(cfg.renderings)).backward()
            losses[rendering] = round(loss.item(), 4)
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        cfg.log.append({"step": step, "seconds": round(time.perf_counter() - t0, 2), **losses})
        bar.update(1)
        bar.set_postfix(losses)
        if step % cfg.save_every == 0 or step == cfg.steps:
            checkpoint()
    bar.close()
    (out / "log.json").write_text(json.dumps(cfg.log, indent=1) + "\n")
    return model
