"""Greedy answers of a trained model on held-out examples, in-process through the engine.

The same measurements as ``bench.streams`` (which goes through tritonserver and takes the
grid's row counts from here), without a server: check a fresh run before shipping it with
``python -m train.evaluate runs/demo/adapter -n 40``.

- grid: the paper's layout, all channels; ``ablate=True`` forces the thinking channels to
  silence from the seed row on (``GridRules.ablate``);
- sequential: the same model served one-stream (the project's layout, no chat template).

``post_input_rows`` counts forward passes once the whole input is known: in the grid, the
row of Output's last answer token minus the user's last row; in one stream, the number of
generated tokens up to the answer's (the first is sampled from the prompt's last token).
"""

from __future__ import annotations

import queue
from dataclasses import asdict, dataclass
from statistics import mean

from backend.engine import Engine, GridRules, Prefix, SamplingParams, StreamSpec
from backend.engine.layout import seed_row, user_tokens
from train.render import OUTPUT_CHANNEL, SEQUENTIAL_SEPARATOR, Renderer
from train.tasks import Example, score

#: Rows a grid session may run (the longest example needs ~16).
MAX_ROWS = 40


@dataclass(frozen=True)
class Outcome:
    family: str
    text: str
    correct: bool
    post_input_rows: int | None
    thinking: str = ""


def _run_all(
    engine: Engine, jobs: list[tuple[dict, int]], window: int = 16, timeout: float = 600.0
) -> list[list]:
    """Runs the jobs, ``window`` at a time (the engine batches their rows), and returns each
    one's events once all its streams finished. A job is ``(Engine.submit keyword arguments,
    stream count)``; the window keeps within the engine's session and queue limits."""
    events: queue.Queue = queue.Queue()
    out: list[list] = [[] for _ in jobs]
    left = [n for _, n in jobs]
    index: dict[str, int] = {}
    submitted = running = 0
    while submitted < len(jobs) or running:
        while submitted < len(jobs) and running < window:
            index[engine.submit(on_event=events.put, **jobs[submitted][0])] = submitted
            submitted += 1
            running += 1
        ev = events.get(timeout=timeout)
        i = index[ev.session_id]
        out[i].append(ev)
        if ev.finished and ev.kind != "user":
            left[i] -= 1
            running -= left[i] == 0
    return out


def grid_outcomes(
    engine: Engine,
    renderer: Renderer,
    examples: list[Example],
    *,
    ablate: bool = False,
    silence_penalty: float = 0.0,
    stop_silent_rows: int = 1,
) -> list[Outcome]:
    """Examples in the paper's layout (greedy), optionally with the thinking channels silenced."""
    c = renderer.num_channels
    thinking = frozenset(range(OUTPUT_CHANNEL + 1, c)) if ablate else frozenset()
    rules = GridRules(
        silence_id=renderer.silence,
        num_channels=c,
        silence_penalty=silence_penalty,
        stop_silent_rows=stop_silent_rows,
        max_rows=MAX_ROWS,
        ablate=thinking,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_ROWS)
    prefix = Prefix.grid([seed_row(renderer.tokenizer, renderer.silence, c, ablate=thinking)])
    jobs, users = [], []
    for ex in examples:
        specs = [
            StreamSpec("output", "output", sampling=greedy, channel=OUTPUT_CHANNEL),
            *(StreamSpec(f"think/{ch}", "reasoning", sampling=greedy, channel=ch) for ch in range(2, c)),
        ]
        users.append(user_tokens(renderer.tokenizer, ex.text))
        jobs.append(({"prefix": prefix, "streams": specs, "rules": rules, "user_ids": users[-1]}, len(specs)))
    outcomes = []
    for ex, user, events in zip(examples, users, _run_all(engine, jobs), strict=True):
        said = [e for e in events if e.stream == "output" and e.token_ids]
        text = "".join(e.text for e in events if e.stream == "output")
        think = "".join(e.text for e in events if e.stream.startswith("think/"))
        rows = max(e.row for e in said) - len(user) if said else None
        outcomes.append(Outcome(ex.family, text, score(ex, text), rows, think))
    return outcomes


def sequential_outcomes(engine: Engine, renderer: Renderer, examples: list[Example]) -> list[Outcome]:
    """Examples served one-stream: read, think out loud, answer (greedy; EOS ends it)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_ROWS)
    jobs = [
        (
            {
                "prefix": renderer.sequential_prompt(ex),
                "streams": [StreamSpec("output", "output", sampling=greedy)],
            },
            1,
        )
        for ex in examples
    ]
    return [
        sequential_from_ids(renderer, ex, [t for e in events for t in e.token_ids])
        for ex, events in zip(examples, _run_all(engine, jobs), strict=True)
    ]


def sequential_from_ids(renderer: Renderer, example: Example, ids: list[int]) -> Outcome:
    """Scores a one-stream generation: the answer is what follows the last " so"."""
    sep = renderer.tokenizer.encode(SEQUENTIAL_SEPARATOR)[0]
    ids = [t for t in ids if t not in renderer.tokenizer.eos_token_ids]
    if sep not in ids:
        return Outcome(example.family, renderer.tokenizer.decode(ids), False, None)
    cut = len(ids) - 1 - ids[::-1].index(sep)
    answer = renderer.tokenizer.decode(ids[cut + 1 :])
    rows = len(ids) if cut + 1 < len(ids) else None
    return Outcome(example.family, answer, score(example, answer), rows, renderer.tokenizer.decode(ids[:cut]))


def summarize(outcomes: list[Outcome]) -> dict:
    """Accuracy, mean post-input rows (over the examples that answered) and per family."""
    rows = [o.post_input_rows for o in outcomes if o.post_input_rows is not None]
    out = {
        "n": len(outcomes),
        "accuracy": mean(o.correct for o in outcomes) if outcomes else 0.0,
        "post_input_rows": mean(rows) if rows else None,
        "answered": len(rows),
    }
    fams = sorted({o.family for o in outcomes})
    out["by_family"] = {f: mean(o.correct for o in outcomes if o.family == f) for f in fams}
    return out


def as_dicts(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


def main(argv: list[str] | None = None) -> int:
    """Merges an adapter folder into a temporary checkpoint and prints the three summaries."""
    import argparse
    import json
    import tempfile
    from pathlib import Path

    from backend.adapter import merge_adapter
    from backend.engine import EngineConfig
    from backend.model_store import resolve_model_dir
    from backend.tokenizer import Tokenizer
    from train.tasks import held_out

    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=main.__doc__)
    p.add_argument("adapter", help="an adapter folder (python -m train's <out>/adapter)")
    p.add_argument("--base", default="default")
    p.add_argument("-n", type=int, default=40, help="held-out examples")
    args = p.parse_args(argv)
    examples = held_out()[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        merge_adapter(resolve_model_dir(args.base), args.adapter, tmp)
        # Dense weights: int4 rounding erases a LoRA fine-tune.
        engine = Engine.from_model_dir(tmp, EngineConfig(quantization="none", max_sessions=16))
        renderer = Renderer(Tokenizer.from_dir(Path(tmp)))
        try:
            result = {
                "grid": summarize(grid_outcomes(engine, renderer, examples)),
                "ablated": summarize(grid_outcomes(engine, renderer, examples, ablate=True)),
                "sequential": summarize(sequential_outcomes(engine, renderer, examples)),
            }
        finally:
            engine.shutdown()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
