"""The in-process baseline of ``bench.compare``, run in its own child process.

``python -m bench.compare_local --system hf --workload FILE --out FILE``

- ``hf``: ``transformers`` ``generate`` (greedy) with a ``TextIteratorStreamer``, one request
  at a time, on the converted default checkpoint (``ensure_default_model()``), in the
  server's dtype and with the same torch thread count.

(llama.cpp is measured as its own server, ``bench.compare_llama_server``, not through the
``llama-cpp-python`` binding: the binding serves one request at a time.)

Why a child process: peak RSS must be the baseline's own (psutil on this pid, sampled by
the parent), and a broken import must turn into a clear "skipped" entry, not a crash of the
whole comparison. It serves one request at a time, so its "aggregate tokens/s at N
concurrent requests" is the sequential throughput of the prompt set (tokens / wall time,
prefill included) — the JSON says so.

Every prompt is chat-templated with the server's tokenizer (``backend.tokenizer``), so all
systems prefill the same ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.compare_common import RequestRecord, Workload, aggregate, decode_rate, now, summarize_requests

SEQUENTIAL_NOTE = "one request at a time: aggregate tokens/s at any concurrency = sequential throughput"

#: (templated prompt text, prompt ids) -> RequestRecord
RunOne = Callable[[str, list[int]], RequestRecord]


def _server_tokenizer() -> Any:
    from backend.model_store import ensure_default_model
    from backend.tokenizer import Tokenizer

    return Tokenizer.from_dir(ensure_default_model(progress=False))


def _templated(tok: Any, text: str) -> tuple[str, list[int]]:
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return prompt, tok.encode(prompt)


# -- HF transformers ---------------------------------------------------------------------------------------
def build_hf(workload: Workload) -> tuple[RunOne, dict[str, Any]]:
    """Load the checkpoint with ``transformers`` and return a one-request runner."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from backend.engine import resolve_dtype
    from backend.model_store import ensure_default_model

    torch.set_num_threads(workload.threads)
    model_dir = ensure_default_model(progress=False)
    # HF runs dense: its dtype is the engine's choice for dense weights (fp32 where torch
    # emulates bf16, which made HF several times slower than it need be on AVX2 CPUs).
    dtype = resolve_dtype(workload.dtype, "cpu", "none")
    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    model.eval()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    load_s = time.monotonic() - t0
    eos = _server_tokenizer().eos_token_ids

    class TimedStreamer(TextIteratorStreamer):
        """``TextIteratorStreamer`` that also stamps each generated token as it is put.

        Text chunks are emitted at word boundaries, so the first *text* can lag the first
        token; the stamp in ``put`` is the moment ``generate`` produced the token.
        """

        def __init__(self) -> None:
            super().__init__(hf_tok, skip_prompt=True, skip_special_tokens=True)
            self.token_times: list[float] = []

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                self.token_times.extend([now()] * int(value.numel()))
            super().put(value)

    def run_one(prompt: str, ids: list[int]) -> RequestRecord:
        streamer = TimedStreamer()
        input_ids = torch.tensor([ids], dtype=torch.long)
        result: dict[str, Any] = {}

        def gen() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=workload.max_tokens,
                        do_sample=False,
                        eos_token_id=eos,
                        pad_token_id=eos[0],
                        streamer=streamer,
                    )
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = e
                streamer.end()

        t0 = now()
        th = threading.Thread(target=gen, daemon=True)
        th.start()
        text = "".join(streamer)  # the documented way to consume TextIteratorStreamer
        th.join()
        t_end = now()
        if "error" in result:
            raise result["error"]
        new_ids = result["out"][0, len(ids) :].tolist()
        times = streamer.token_times
        n = len(new_ids)
        if n and new_ids[-1] in eos:  # the server does not count the stop token as output
            n -= 1
        return RequestRecord(
            ttft_s=(times[0] - t0) if times else t_end - t0,
            tokens=n,
            total_s=(times[n - 1] if n else t_end) - t0,
            decode_tok_s=decode_rate(n, times[0] if times else None, times[n - 1] if n else None),
            prompt_tokens=len(ids),
            extra={"chars": len(text)},
        )

    info = {
        "engine": f"transformers {transformers.__version__} generate + TextIteratorStreamer",
        "model": str(model_dir),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
    }
    return run_one, info


BUILDERS: dict[str, Callable[[Workload], tuple[RunOne, dict[str, Any]]]] = {
    "hf": build_hf,
}


def run_system(system: str, workload: Workload) -> dict[str, Any]:
    """Warm up, then one sequential pass over the prompt set and the long prompt."""
    tok = _server_tokenizer()
    run_one, info = BUILDERS[system](workload)
    run_one(*_templated(tok, "Hello!"))  # warm-up: first-call allocations, kernel selection

    records: list[RequestRecord] = []
    t0 = now()
    for text in workload.prompts:
        records.append(run_one(*_templated(tok, text)))
    wall = now() - t0
    seq = aggregate(records, wall, 1, SEQUENTIAL_NOTE)
    by_conc = {str(c): {**seq, "concurrency": c} for c in workload.concurrency}

    long_prompt = _templated(tok, workload.long_prompt)
    long_runs = [run_one(*long_prompt) for _ in range(max(1, workload.long_repeats))]
    return {
        "system": system,
        "available": True,
        "info": info,
        "one_at_a_time": True,
        "requests": summarize_requests(records),
        "aggregate": by_conc,
        "aggregate_note": SEQUENTIAL_NOTE,
        "long_prompt": {
            "prompt_tokens": long_runs[0].prompt_tokens,
            "ttft_s": min(r.ttft_s for r in long_runs),  # best of N: see bench.compare
            "ttft_runs_s": [r.ttft_s for r in long_runs],
        },
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "records": [asdict(r) for r in records],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_local", description=__doc__.split("\n\n")[0])
    p.add_argument("--system", required=True, choices=sorted(BUILDERS))
    p.add_argument("--workload", required=True, help="JSON file written by bench.compare")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    args = p.parse_args(argv)
    workload = Workload.from_json(Path(args.workload).read_text(encoding="utf-8"))
    os.environ.setdefault("OMP_NUM_THREADS", str(workload.threads))
    try:
        result = run_system(args.system, workload)
    except ImportError as e:
        result = {"system": args.system, "available": False, "skipped": f"import failed: {e}"}
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the comparison goes on
        result = {
            "system": args.system,
            "available": False,
            "skipped": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=8),
        }
    result["python"] = platform.python_version()
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if result.get("available") else 3


if __name__ == "__main__":
    sys.exit(main())
