"""Comparison benchmark: ``python -m bench.compare --json [--quick] [--out results/compare]``.

In one run, the same prompt set (``load/prompts.json``, shared with the locust test) and a
512-token prompt go through:

(a) ``multistream``        the Triton server (``launcher.serve.start_server``) via ``client/``;
                           also with ``reasoning_streams=1, reasoning_budget=256``;
(b) ``think_then_answer``  the same server, reasoning first and then the answer, as two
                           requests (definition: ``bench.compare_triton``);
(c) ``hf``                 ``transformers`` ``generate`` + ``TextIteratorStreamer``, one request
                           at a time, same weights, dtype and threads;
(d) ``llama_server``       llama.cpp's own server on the same GGUF: parallel slots, continuous
                           batching, its OpenAI streaming endpoint (``bench.compare_llama_server``;
                           built once from the ``llama-cpp-python`` sdist, ``bench.llama_server``).

Per system: answer TTFT p50/p95, decode tokens/s per request, aggregate tokens/s at 1, 4
and 16 concurrent requests (for one-at-a-time systems that is their sequential throughput,
and the JSON says so), peak RSS (the server's whole process tree; the child process for
(c); llama-server's process for (d)), TTFT on the 512-token prompt (best of
``--long-repeats`` runs: on a shared machine one run can land on a busy moment, and the
minimum is the figure least disturbed by others), and for (a) and (d) the repeated-prefix
TTFT: the long prompt's passage with new questions, both prefix caches on. Every other
measurement of (a) and (d) runs with its cache off (for (a), a server started with
``prefix_cache_mb=0``; then a second one with the default for the repeated-prefix test), so
no request is shortened by an earlier one's KV. Each server runs alone: (a)/(b) are
stopped before (c) and (d) start. Writes ``compare.json`` and ``compare.png`` to ``--out`` and
prints a table; ``--json`` also prints the JSON on stdout.

Why ratios: the targets (issues 4 and 12) compare systems measured in the same run on the
same machine, since this machine is shared and absolute figures drift with the load. The
load average before and after is recorded so a reader can tell a noisy run.

Timing rules, the same for every system: greedy decoding, client-side clock
(``time.perf_counter``); TTFT = request sent -> first user-facing token; decode rate =
(tokens - 1) / (last token - first token), prefill excluded; aggregate = user-facing
tokens of a level / wall time of the level, prefill included. Each system gets one warm-up
request first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare_common import REPO_ROOT, RssMonitor, Workload, load_prompts, make_long_prompt

ALL_SYSTEMS = ("multistream", "think_then_answer", "hf", "llama_server")
LABELS = {
    "multistream": "(a) multistream (Triton)",
    "think_then_answer": "(b) think-then-answer (Triton)",
    "hf": "(c) HF generate",
    "llama_server": "(d) llama-server",
}
#: Issue 12's targets against llama-server, by concurrency level (aggregate tok/s ratio).
AGGREGATE_VS_LLAMA_SERVER = {1: 1.0, 4: 1.0, 16: 1.5}
TARGETS = {
    "aggregate_vs_hf": 4.0,
    "long_prompt_ttft_vs_llama_server": 1.0,
    "ttft_p50_at_top_vs_llama_server": 1.0,
    "repeated_prefix_ttft_vs_llama_server": 1.5,
    "reasoning_answer_ttft_speedup": 10.0,
}
#: One child process (HF) may take this long before it is killed.
LOCAL_TIMEOUT_S = 1200


def cpu_count() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def machine_info(threads: int, dtype: str) -> dict[str, Any]:
    """What the figures were measured on: the JSON is meaningless without it."""
    import torch

    from backend.engine import resolve_dtype

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"torch": torch.__version__, "python": platform.python_version()}
    from importlib import metadata

    for dist in ("transformers", "openai", "tritonclient", "nvidia-pytriton"):
        try:  # distribution metadata: tritonclient has no __version__, and nothing gets imported
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "cores": cpu_count(),
        "logical_cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "threads": threads,
        "dtype": str(resolve_dtype(dtype)).replace("torch.", ""),
        "dtype_setting": dtype,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "versions": versions,
    }


# -- systems ----------------------------------------------------------------------------------------------
def run_server_systems(
    systems: list[str], workload: Workload, args: argparse.Namespace, questions: list[str]
) -> dict[str, dict[str, Any]]:
    """(a) and (b) against one server: started here unless ``--url`` names a running one."""
    from bench.compare_triton import run_multistream, run_reasoning_comparison, run_repeated_prefix

    out: dict[str, dict[str, Any]] = {}

    def measure(url: str, pid: int | None, server_info: dict[str, Any]) -> None:
        if "multistream" in systems:
            _log("(a) multistream: prompt set, concurrency levels, long prompt ...")
            with _maybe_rss(pid) as rss:
                res = run_multistream(url, workload)
            res["peak_rss_mib"] = rss.peak_mib if rss else None
            res["server"] = server_info
            out["multistream"] = res
        if args.reasoning_prompts > 0 and ("think_then_answer" in systems or "multistream" in systems):
            _log(f"(a)+reasoning vs (b) think-then-answer on {len(questions)} question(s) ...")
            with _maybe_rss(pid) as rss:
                ms_reason, tta = run_reasoning_comparison(
                    url, questions, args.reasoning_budget, workload.max_tokens
                )
            if "multistream" in out:
                out["multistream"]["with_reasoning"] = ms_reason
                if rss:
                    out["multistream"]["peak_rss_mib"] = max(out["multistream"]["peak_rss_mib"], rss.peak_mib)
            else:
                out["multistream"] = {"system": "multistream", "available": True, "with_reasoning": ms_reason}
            if "think_then_answer" in systems:
                tta["peak_rss_mib"] = rss.peak_mib if rss else None
                tta["peak_rss_note"] = "same server process tree as (a)"
                tta["server"] = server_info
                out["think_then_answer"] = tta

    def repeated_prefix(url: str) -> None:
        if "multistream" in out and out["multistream"].get("available"):
            _log("(a) multistream: the repeated-prefix test, prefix cache on ...")
            out["multistream"]["repeated_prefix"] = run_repeated_prefix(url, workload)

    if args.url:
        info = {"url": args.url, "started_here": False, "prefix_cache": "as the server is configured"}
        measure(args.url, None, info)
        repeated_prefix(args.url)
        return out

    from launcher.serve import ServerError, start_server

    threads = _parse_threads(args.server_threads, workload.threads)

    def start(prefix_cache: bool) -> Any:
        """The server; the throughput levels run with the prefix cache off, as llama-server's."""
        _log(
            f"starting the multistream server (threads {threads}, prefix cache {'on' if prefix_cache else 'off'}) ..."
        )
        return start_server(
            model_dir="default",
            dtype=workload.dtype,
            decode_instances=args.decode_instances,
            reasoning_instances=1,
            prefill_instances=1,
            preprocessing_instances=1,
            threads=threads,
            max_sessions=max(32, 2 * max(workload.concurrency)),
            parameters=_server_parameters(args.param, prefix_cache),
            log_level="warning",
            ready_timeout=600,
        )

    for prefix_cache in (False, True):
        if prefix_cache and "multistream" not in out:
            break
        try:
            handle = start(prefix_cache)
        except (ServerError, OSError, RuntimeError, ValueError) as e:
            reason = f"server did not start: {str(e).splitlines()[0]}"
            if not prefix_cache:
                return {s: _skipped(s, reason) for s in systems if s in ("multistream", "think_then_answer")}
            out["multistream"]["repeated_prefix"] = {"skipped": reason}
            break
        with handle:
            info = {
                "started_here": True,
                "startup_s": handle.startup_s,
                "threads": threads,
                "decode_instances": args.decode_instances,
                "prefix_cache": prefix_cache,
                "parameters": _server_parameters(args.param, prefix_cache),
            }
            try:
                if prefix_cache:
                    repeated_prefix(handle.grpc_url)
                else:
                    measure(handle.grpc_url, handle.process.pid, info)
            except Exception as e:  # noqa: BLE001 - recorded; the local baselines still run
                reason = f"{type(e).__name__}: {e}"
                for s in systems:
                    if s in ("multistream", "think_then_answer") and s not in out:
                        out[s] = _skipped(s, f"failed during the run: {reason}")
                out.setdefault("_server_log_tail", {"log": handle.log_tail(30)})  # type: ignore[arg-type]
    return out


def run_local_system(system: str, workload: Workload, out_dir: Path) -> dict[str, Any]:
    """(c)/(d) in a child process (``bench.compare_local``), its RSS sampled from here."""
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        wl_path = Path(tmp) / "workload.json"
        wl_path.write_text(workload.to_json(), encoding="utf-8")
        res_path = Path(tmp) / "result.json"
        log_path = out_dir / f"{system}.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(workload.threads), TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "bench.compare_local", "--system", system]
        cmd += ["--workload", str(wl_path), "--out", str(res_path)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
            with RssMonitor(proc.pid) as rss:
                try:
                    proc.wait(timeout=LOCAL_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    return _skipped(system, f"timed out after {LOCAL_TIMEOUT_S}s (log {log_path})")
        if not res_path.exists():
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            return _skipped(system, f"child exited with code {proc.returncode}: {' | '.join(tail)}")
        res = json.loads(res_path.read_text(encoding="utf-8"))
    if res.get("available"):
        res["peak_rss_mib"] = rss.peak_mib
    return res


def run_llama_server_system(workload: Workload, out_dir: Path, allow_build: bool) -> dict[str, Any]:
    """(d), with any failure (build, start, a request) turned into a "skipped" entry."""
    from bench.compare_llama_server import run_llama_server

    try:
        return run_llama_server(workload, out_dir, allow_build)
    except Exception as e:  # noqa: BLE001 - recorded; the other systems' figures stay
        entry = _skipped("llama_server", f"{type(e).__name__}: {str(e)[:800]}")
        for log in sorted(out_dir.glob("llama_server*.log")):
            lines = log.read_text(errors="replace").strip().splitlines()
            entry[f"{log.stem}_tail"] = lines[-15:]
        return entry


# -- summary ----------------------------------------------------------------------------------------------
def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def compute_ratios(results: dict[str, dict[str, Any]], concurrency: list[int]) -> dict[str, Any]:
    """The issue's targets, as ratios of figures measured in this run (None if a side is missing)."""
    top = str(max(concurrency))
    ms_agg = _get(results.get("multistream"), "aggregate", top, "tok_s")

    def ratio(num: float | None, den: float | None) -> float | None:
        return num / den if num and den else None

    def entry(
        name: str,
        value: float | None,
        how: str,
        lower_is_better: bool = False,
        target: float | None = None,
        **extra: Any,
    ) -> dict:
        target = TARGETS[name] if target is None else target
        ok = None if value is None else (value <= target if lower_is_better else value >= target)
        return {
            "value": value,
            "target": f"{'<=' if lower_is_better else '>='} {target:g}",
            "met": ok,
            "how": how,
            **extra,
        }

    ms, ls = results.get("multistream"), results.get("llama_server")
    tta = _get(results.get("think_then_answer"), "requests", "ttft_p50_s")
    ms_reason = _get(results.get("multistream"), "with_reasoning", "ttft_p50_s")
    per_level = {
        f"aggregate_vs_llama_server_at_{c}": entry(
            "aggregate_vs_llama_server",
            ratio(_get(ms, "aggregate", str(c), "tok_s"), _get(ls, "aggregate", str(c), "tok_s")),
            f"multistream aggregate tok/s / llama-server aggregate tok/s, {c} concurrent clients",
            target=AGGREGATE_VS_LLAMA_SERVER.get(c, 1.0),
            concurrency=c,
        )
        for c in concurrency
    }
    return {
        **per_level,
        "ttft_p50_at_top_vs_llama_server": entry(
            "ttft_p50_at_top_vs_llama_server",
            ratio(_get(ms, "aggregate", top, "ttft_p50_s"), _get(ls, "aggregate", top, "ttft_p50_s")),
            f"answer TTFT p50 with {top} concurrent clients, multistream / llama-server (lower is better)",
            lower_is_better=True,
            concurrency=int(top),
        ),
        "long_prompt_ttft_vs_llama_server": entry(
            "long_prompt_ttft_vs_llama_server",
            ratio(_get(ms, "long_prompt", "ttft_s"), _get(ls, "long_prompt", "ttft_s")),
            "TTFT on the long prompt, multistream / llama-server, prompt cache off (lower is better)",
            lower_is_better=True,
        ),
        "repeated_prefix_ttft_vs_llama_server": entry(
            "repeated_prefix_ttft_vs_llama_server",
            ratio(_get(ms, "repeated_prefix", "ttft_p50_s"), _get(ls, "repeated_prefix", "ttft_p50_s")),
            "TTFT p50 of a repeated long passage with a new question, both prefix caches on, "
            "multistream / llama-server (lower is better)",
            lower_is_better=True,
        ),
        "aggregate_vs_hf": entry(
            "aggregate_vs_hf",
            ratio(ms_agg, _get(results.get("hf"), "aggregate", top, "tok_s")),
            f"multistream aggregate tok/s at {top} concurrent / HF generate sequential tok/s",
            concurrency=int(top),
        ),
        "reasoning_answer_ttft_speedup": entry(
            "reasoning_answer_ttft_speedup",
            ratio(tta, ms_reason),
            "think-then-answer answer TTFT p50 / multistream answer TTFT p50 with one reasoning "
            "stream, same budget",
        ),
        "reasoning_answer_ttft_speedup_full_budget_est": entry(
            "reasoning_answer_ttft_speedup",
            ratio(_get(results.get("think_then_answer"), "ttft_full_budget_est_p50_s"), ms_reason),
            "ESTIMATE: as reasoning_answer_ttft_speedup, with (b) extrapolated to a thinking that "
            "uses the whole budget (the model often stops earlier)",
            estimate=True,
        ),
    }


def print_table(report: dict[str, Any], file: Any) -> None:
    """Human summary with rich (to stderr when --json owns stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=160)
    conc = report["workload"]["concurrency"]
    t = Table(title=f"bench.compare — {report['machine']['cores']} cores, {report['machine']['dtype']}")
    t.add_column("system")
    for col in (
        "TTFT p50",
        "TTFT p95",
        "decode tok/s",
        *[f"agg@{c}" for c in conc],
        f"TTFT p50@{conc[-1]}",
        "TTFT 512",
        "prefix TTFT",
        "peak RSS",
    ):
        t.add_column(col, justify="right")
    t.add_column("note")

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    for name in ALL_SYSTEMS:
        r = report["systems"].get(name)
        if r is None:
            continue
        if not r.get("available"):
            t.add_row(LABELS[name], *["-"] * (7 + len(conc)), f"skipped: {r.get('skipped', '')[:70]}")
            continue
        req = r.get("requests", {})
        note = "one at a time" if r.get("one_at_a_time") else ""
        t.add_row(
            LABELS[name],
            f(req.get("ttft_p50_s"), "{:.3f}s"),
            f(req.get("ttft_p95_s"), "{:.3f}s"),
            f(req.get("decode_tok_s_mean"), "{:.1f}"),
            *[f(_get(r, "aggregate", str(c), "tok_s"), "{:.1f}") for c in conc],
            "" if r.get("one_at_a_time") else f(_get(r, "aggregate", str(conc[-1]), "ttft_p50_s"), "{:.3f}s"),
            f(_get(r, "long_prompt", "ttft_s"), "{:.3f}s"),
            f(_get(r, "repeated_prefix", "ttft_p50_s"), "{:.3f}s"),
            f(r.get("peak_rss_mib"), "{:.0f} MiB"),
            note,
        )
        wr = r.get("with_reasoning")
        if wr:
            t.add_row(
                "  + 1 reasoning stream",
                f(wr.get("ttft_p50_s"), "{:.3f}s"),
                f(wr.get("ttft_p95_s"), "{:.3f}s"),
                f(wr.get("decode_tok_s_mean"), "{:.1f}"),
                *["" for _ in conc],
                "",
                "",
                "",
                "",
                f"budget {wr.get('reasoning_budget')}, {wr.get('reasoning_tokens_mean', 0):.0f} reasoning tok",
            )
    console.print(t)
    rt = Table(title="targets (same run)")
    for col in ("ratio", "value", "target", "met"):
        rt.add_column(col)
    for name, e in report["ratios"].items():
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "n/a"}[e["met"]]
        rt.add_row(name, f(e["value"], "{:.2f}x"), e["target"], met)
    console.print(rt)


def write_chart(report: dict[str, Any], path: Path) -> None:
    """Left: aggregate tok/s by concurrency per system. Right: TTFT bars (log scale)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = report["workload"]["concurrency"]
    systems = {k: v for k, v in report["systems"].items() if v.get("available")}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, r in systems.items():
        ys = [_get(r, "aggregate", str(c), "tok_s") for c in conc]
        pts = [(c, y) for c, y in zip(conc, ys, strict=True) if y]
        if not pts:
            continue
        style = "--" if r.get("one_at_a_time") else "-"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=LABELS[name])
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(conc, [str(c) for c in conc])
    ax1.set_xlabel("concurrent requests")
    ax1.set_ylabel("aggregate user-facing tokens/s")
    ax1.set_title("Aggregate throughput (dashed: one request at a time)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)

    groups = [
        ("answer TTFT p50", lambda r: _get(r, "requests", "ttft_p50_s")),
        ("TTFT long prompt", lambda r: _get(r, "long_prompt", "ttft_s")),
        ("TTFT repeated prefix", lambda r: _get(r, "repeated_prefix", "ttft_p50_s")),
        ("answer TTFT w/ reasoning", lambda r: _get(r, "with_reasoning", "ttft_p50_s")),
    ]
    names = list(systems)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [fn(systems[name]) for _, fn in groups]
        if name == "think_then_answer":  # its answer TTFT is the reasoning comparison's other side
            vals = [None, None, None, _get(systems[name], "requests", "ttft_p50_s")]
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        bars = ax2.bar(xs, [v or 0 for v in vals], width, label=LABELS[name])
        for b, v in zip(bars, vals, strict=True):
            if v:
                ax2.annotate(
                    f"{v:.2f}s", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7
                )
    ax2.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax2.set_yscale("log")
    ax2.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_ylabel("seconds (log)")
    ax2.set_title(f"TTFT (long prompt: {report['workload']['long_prompt_tokens']} tokens)")
    ax2.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"bench.compare — {m['cores']} cores, {m['threads']} threads, {m['dtype']}, torch "
        f"{m['versions']['torch']}, max_tokens {report['workload']['max_tokens']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- CLI --------------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[bench.compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _skipped(system: str, reason: str) -> dict[str, Any]:
    return {"system": system, "available": False, "skipped": reason}


class _maybe_rss:  # noqa: N801 - used like a function in ``with``
    """RssMonitor on ``pid``, or nothing (``None``) when the server is not ours to watch."""

    def __init__(self, pid: int | None) -> None:
        self._mon = RssMonitor(pid) if pid else None

    def __enter__(self) -> RssMonitor | None:
        return self._mon.__enter__() if self._mon else None

    def __exit__(self, *exc: object) -> None:
        if self._mon:
            self._mon.__exit__(*exc)


def _parse_threads(spec: str | None, default: int) -> dict[str, int]:
    """``decode=2,prefill=2,reasoning=1``; unspecified heavy models get the deployment's
    default for ``default`` cores (``DeployConfig.threads_for``), so that the server measured
    here is the one ``scripts/run.sh`` starts."""
    from launcher.deploy_config import HEAVY_MODELS, DeployConfig

    cfg = DeployConfig(cores=default)
    threads = {m: cfg.threads_for(m) for m in HEAVY_MODELS}
    for item in (spec or "").split(","):
        if item.strip():
            name, _, n = item.partition("=")
            threads[name.strip()] = int(n)
    return threads


def _server_parameters(specs: list[str], prefix_cache: bool) -> dict[str, dict[str, str]] | None:
    """Model parameters of the server started here: ``--param MODEL.KEY=VALUE`` (``*`` = every
    model), plus ``prefix_cache_mb 0`` for the throughput levels (llama-server's cache is off
    there too). ``ValueError`` names a malformed spec."""
    params: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, eq, value = spec.partition("=")
        model, dot, key = target.partition(".")
        if not eq or not dot or not model or not key:
            raise ValueError(f"--param {spec!r}: expected MODEL.KEY=VALUE, e.g. decode.int4_prompts=true")
        params.setdefault(model, {})[key] = value
    if not prefix_cache:
        params.setdefault("*", {})["prefix_cache_mb"] = "0"
    return params or None


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout (table -> stderr)")
    p.add_argument("--out", default="results/compare", help="folder for compare.json, compare.png, logs")
    p.add_argument("--quick", action="store_true", help="2-minute smoke version (fewer prompts/tokens)")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--concurrency", default=None, help="comma list (default 1,4,16; quick 1,4)")
    p.add_argument("--max-tokens", type=int, default=None, help="answer tokens (default 64; quick 16)")
    p.add_argument("--prompts", type=int, default=None, help="use the first N prompts (default all; quick 4)")
    p.add_argument("--reasoning-budget", type=int, default=None, help="default 256 (quick 64)")
    p.add_argument("--reasoning-prompts", type=int, default=None, help="questions for (a)+reasoning vs (b)")
    p.add_argument("--long-tokens", type=int, default=512, help="templated length of the long prompt")
    p.add_argument("--long-repeats", type=int, default=None, help="runs of the long prompt (best of N)")
    p.add_argument("--prefix-requests", type=int, default=None, help="repeated-prefix requests (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch/llama.cpp threads (default: all cores)")
    p.add_argument("--server-threads", default=None, help="e.g. decode=2,prefill=2,reasoning=1")
    p.add_argument("--dtype", default="auto", help="server and HF dtype (auto = the engine's choice)")
    p.add_argument(
        "--decode-instances",
        type=int,
        default=1,
        help="decode instances of the server it starts (default 1; each gets the decode threads)",
    )
    p.add_argument(
        "--requests-per-worker",
        type=int,
        default=None,
        help="closed-loop requests per worker at each concurrency level (default 3; quick 1)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="MODEL.KEY=VALUE",
        help="a model parameter of the server started here, repeatable "
        "(e.g. prefill.prefill_at=decode, decode.int4_prompts=true; '*' = every model)",
    )
    p.add_argument("--url", default=None, help="gRPC host:port of a running server (else one is started)")
    args = p.parse_args(argv)
    try:
        _server_parameters(args.param, True)
    except ValueError as e:
        p.error(str(e))
    if args.param and args.url:
        p.error("--param sets parameters of the server started here; it cannot reach a running one (--url)")
    q = args.quick
    if args.concurrency is None:
        args.concurrency = "1,4" if q else "1,4,16"
    args.concurrency = _ints(args.concurrency)
    args.max_tokens = args.max_tokens or (16 if q else 64)
    args.prompts = args.prompts if args.prompts is not None else (4 if q else 0)
    args.reasoning_budget = args.reasoning_budget or (64 if q else 256)
    if args.reasoning_prompts is None:
        args.reasoning_prompts = 1 if q else 3
    args.long_repeats = args.long_repeats or (1 if q else 3)
    args.prefix_requests = args.prefix_requests or (3 if q else 4)
    args.requests_per_worker = args.requests_per_worker or (1 if q else 3)
    args.threads = args.threads or cpu_count()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = set(args.systems) - set(ALL_SYSTEMS)
    if bad:
        p.error(f"unknown system(s) {sorted(bad)}; choose from {', '.join(ALL_SYSTEMS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from backend.model_store import ensure_default_model
    from backend.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ensure_default_model(progress=False))
    prompts, prompt_source = load_prompts()
    if args.prompts:
        # spread the subset over the set, which is ordered short -> long
        step = max(1, len(prompts) // args.prompts)
        prompts = prompts[::step][: args.prompts]
    long_text, long_len = make_long_prompt(tok, args.long_tokens)
    workload = Workload(
        prompts=prompts,
        long_prompt=long_text,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        long_repeats=args.long_repeats,
        threads=args.threads,
        dtype=args.dtype,
        requests_per_worker=args.requests_per_worker,
        prefix_requests=args.prefix_requests,
    )
    # Reasoning questions: the longer, question-like half of the set.
    questions = (
        [p for p in prompts if len(p) < 400][-args.reasoning_prompts :] if args.reasoning_prompts else []
    )

    report: dict[str, Any] = {
        "command": "python -m bench.compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(args.threads, args.dtype),
        "load_average_start": os.getloadavg(),
        "workload": {
            "prompt_source": prompt_source,
            "prompts": len(prompts),
            "prompt_tokens": [
                len(tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))) for p in prompts
            ],
            "long_prompt_tokens": long_len,
            "long_repeats": args.long_repeats,
            "prefix_requests": args.prefix_requests,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "requests_per_level": {str(c): len(workload.requests_at(c)) for c in args.concurrency},
            "reasoning_budget": args.reasoning_budget,
            "reasoning_questions": len(questions),
            "sampling": "greedy",
            "quick": args.quick,
        },
        "definitions": {
            "ttft": "client clock: request sent -> first user-facing token",
            "decode_tok_s": "(tokens - 1) / (last token - first token) per request, prefill excluded",
            "aggregate_tok_s": "user-facing tokens of all requests of a level / wall time of the level",
            "one_at_a_time": "(c) and (b) serve one request at a time: aggregate = sequential throughput",
            "repeated_prefix_ttft": "the long prompt's passage with a new question each time; p50 "
            "over the 2nd.. requests (the 1st fills the cache); both systems' prefix caches on",
            "peak_rss": "psutil RSS sampled every 50 ms: server = whole process tree (tritonserver + "
            "every Python stub); (c) = its child process; (d) = the llama-server process",
        },
        "systems": {},
    }

    results: dict[str, dict[str, Any]] = {}
    server_systems = [s for s in args.systems if s in ("multistream", "think_then_answer")]
    if server_systems:
        results.update(run_server_systems(server_systems, workload, args, questions))
    if "hf" in args.systems:
        _log("(c) hf ...")
        results["hf"] = run_local_system("hf", workload, out_dir)
    if "llama_server" in args.systems:
        _log("(d) llama-server: prompt cache off, then the repeated-prefix test with it on ...")
        results["llama_server"] = run_llama_server_system(workload, out_dir, allow_build=not args.quick)
    log_tail = results.pop("_server_log_tail", None)
    if log_tail:
        report["server_log_tail"] = log_tail["log"]
    report["systems"] = {s: results[s] for s in ALL_SYSTEMS if s in results}
    report["ratios"] = compute_ratios(results, args.concurrency)
    report["load_average_end"] = os.getloadavg()
    report["elapsed_s"] = time.monotonic() - t_start

    json_path = out_dir / "compare.json"
    json_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    chart = out_dir / "compare.png"
    try:
        write_chart(report, chart)
        report["chart"] = str(chart)
    except Exception as e:  # noqa: BLE001 - a chart failure must not lose the figures
        report["chart"] = f"not written: {type(e).__name__}: {e}"
    json_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print_table(report, sys.stderr if args.json else sys.stdout)
    _log(f"wrote {json_path} and {chart} in {report['elapsed_s']:.0f}s")
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
