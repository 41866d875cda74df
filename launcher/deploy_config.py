"""Deployment settings for the model repository, kept in ONE place.

Why: instance counts, device kind, torch threads and engine parameters must
agree across every ``config.pbtxt``; editing them by hand in seven files drifts.
``launcher.serve`` renders ``model_repository/`` into a run directory from a
:class:`DeployConfig` (defaults here, then a TOML/JSON file, then CLI flags).

The stubs read them back with ``backend.serving.parameters.model_parameters``, not
from here: what Triton loads never imports the launcher.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from backend.serving.parameters import DEFAULT_MAX_QUEUED

# Models that run the torch engine: they get the cores and, with a GPU, KIND_GPU.
HEAVY_MODELS = ("prefill", "decode", "reasoning")


def cpu_count() -> int:
    """Cores this process may use (affinity-aware; containers often restrict it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class DeployConfig:
    """Everything ``serve`` needs to render the repository and start tritonserver."""

    model_dir: str = "default"  # "default" -> backend.model_store.ensure_default_model(); "none" -> skip
    dtype: str = "auto"  # "auto" = bfloat16 on GPU, float32 on CPU (decided by the engine)
    kind: str = "auto"  # "auto" | "KIND_CPU" | "KIND_GPU" for HEAVY_MODELS; light models stay on CPU
    max_sessions: int = 32
    max_context: int = 2048
    cores: int = 0  # 0 = all cores of this machine, shared by the heavy instances (threads_for)
    instances: dict[str, int] = field(
        default_factory=lambda: {
            "preprocessing": 1,
            "prefill": 1,
            "decode": 1,
            "reasoning": 1,
            "postprocessing": 1,
            "session_control": 1,
        }
    )
    threads: dict[str, int] = field(default_factory=dict)  # explicit per-model override of the division
    parameters: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # extra per-model parameters; "*" = all
    # The prefill -> decode KV wire (launcher/gpu.py): auto = bfloat16 on KIND_GPU with a bf16 engine, else float32.
    handoff_dtype: str = "auto"
    log_level: str = "warning"  # error | warning | info | verbose
    # Each stub talks to the server through its own /dev/shm region (1 MiB, +1 MiB steps by default);
    # KV-cache hand-offs are tens of MiB, so start bigger and grow in big steps.
    backend_config: list[str] = field(
        default_factory=lambda: [
            "python,shm-default-byte-size=16777216",
            "python,shm-growth-byte-size=67108864",
        ]
    )

    # -- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> DeployConfig:
        """Read a TOML (``.toml``) or JSON file; unknown keys are an error, not silently ignored."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
        return cls().merged(data, source=str(path))

    def merged(self, data: dict[str, Any], source: str = "overrides") -> DeployConfig:
        """A copy with ``data`` applied; dict fields merge key by key, None values are ignored."""
        known = {f.name for f in fields(self)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown deploy setting(s) {sorted(unknown)}; known: {sorted(known)}")
        out = DeployConfig(**{f.name: _copy(getattr(self, f.name)) for f in fields(self)})
        for key, value in data.items():
            if value is None:
                continue
            current = getattr(out, key)
            if isinstance(current, dict):
                current.update({k: v for k, v in value.items() if v is not None})
            else:
                setattr(out, key, value)
        return out

    # -- derived values ----------------------------------------------------------------------------------
    def resolved_kind(self) -> str:
        """KIND_GPU when asked for or (auto) when torch sees a GPU, else KIND_CPU."""
        if self.kind != "auto":
            if self.kind not in ("KIND_CPU", "KIND_GPU"):
                raise ValueError(f"kind must be auto, KIND_CPU or KIND_GPU, not {self.kind!r}")
            return self.kind
        try:
            import torch

            return "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU"
        except ImportError:
            return "KIND_CPU"

    def threads_for(self, model: str) -> int:
        """Torch threads per instance: decode and prefill get the cores (each divided among
        its own instances), reasoning half of them.

        Why not the cores divided among all heavy instances (the first rule): decode and
        prefill take turns on a request's critical path, and with prompts computed in decode
        (``prefill_at`` auto on a CPU) prefill computes nothing at all, while reasoning runs
        beside decode only when a request asks for it. On 2 cores the division left decode
        one thread: ``bench.compare`` gave 66.2 / 103.5 / 107.5 tok/s at 1 / 4 / 16 clients
        against 101.8 / 155.6 / 134.9 with decode 2, prefill 2, reasoning 1, the split the
        benchmark had always used (now the same rule, not a copy). The sum exceeds the cores,
        so the workers do not spin (``openmp_env``).
        """
        if model in self.threads:
            return max(1, int(self.threads[model]))
        if model not in HEAVY_MODELS:
            return 1
        cores = self.cores or cpu_count()
        share = max(1, cores // 2) if model == "reasoning" else cores
        return max(1, share // max(1, self.instances.get(model, 1)))

    def openmp_env(self) -> dict[str, str]:
        """``OMP_WAIT_POLICY=PASSIVE`` when the instances' torch threads outnumber the cores.

        Why: libgomp workers spin-wait between parallel regions. That is what one engine
        alone on its cores wants (a 14 ms step instead of 24), but when several stubs share
        the cores the spinning workers of one steal the cores the others compute on:
        ``bench.compare``'s server (decode 2 + prefill 2 + reasoning 1 threads on 2 cores)
        fell from 111 to 54 tok/s at 16 clients with spinning, 69 with a 10k spin count.
        Instances on 1 thread never open a parallel region, so the policy is moot there.
        """
        threads = {m: self.threads_for(m) for m in HEAVY_MODELS}
        heavy = sum(self.instances.get(m, 1) * n for m, n in threads.items())
        if max(threads.values()) > 1 and heavy > (self.cores or cpu_count()):
            return {"OMP_WAIT_POLICY": "PASSIVE"}
        return {}

    def python_thread_pool(self) -> int:
        """Threads of each python model instance's pool in tritonserver (``thread-pool-size``).

        Why: Triton 2.51's python backend runs each BLS call of a model instance on a thread of
        that instance's pool for the call's whole life (``ExecuteBLSRequest``), and every
        response a decoupled stub sends needs a thread of the same pool. With the default 32,
        32 live calls (decode calling reasoning for each session, tensorrt_llm_bls calling
        decode for each request) leave none: every response of that instance then waits for a
        call to end. Measured: 32 clients with reasoning streams heard nothing for 20 s. So the
        pool holds every session decode may keep (running and queued, on every decode
        instance: tensorrt_llm_bls may call all of them) plus the default's 32 for the sends.
        """
        decode = self.model_params("decode")
        queued = int(decode.get("max_queued", DEFAULT_MAX_QUEUED))
        return self.instances.get("decode", 1) * (int(decode["max_sessions"]) + queued) + 32

    def backend_configs(self) -> list[str]:
        """``--backend-config`` values: ``backend_config``, plus the python thread pool's size
        (:meth:`python_thread_pool`) unless ``backend_config`` sets one."""
        configs = list(self.backend_config)
        if not any(c.startswith("python,thread-pool-size=") for c in configs):
            configs.append(f"python,thread-pool-size={self.python_thread_pool()}")
        return configs

    def model_params(self, model: str) -> dict[str, str]:
        """The ``parameters`` written into ``model``'s config.pbtxt (all strings, as Triton wants)."""
        params = {
            "model_dir": self.model_dir,
            "dtype": self.dtype,
            "threads": str(self.threads_for(model)),
            "max_sessions": str(self.max_sessions),
            "max_context": str(self.max_context),
        }
        params.update({k: str(v) for k, v in self.parameters.get("*", {}).items()})
        params.update({k: str(v) for k, v in self.parameters.get(model, {}).items()})
        return params


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


# -- config.pbtxt rendering --------------------------------------------------------------------------------

_PARAM_RE = re.compile(r'key\s*:\s*"([^"]*)"\s*value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}')


def _top_level_blocks(text: str, name: str) -> list[tuple[int, int]]:
    """Spans of top-level ``name [: ] {..}`` / ``name [: ] [..]`` entries (depth 0, outside strings/comments)."""
    spans: list[tuple[int, int]] = []
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif (
            depth == 0
            and text.startswith(name, i)
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))
        ):
            j = i + len(name)
            while j < n and text[j] in " \t\r\n:":
                j += 1
            if (
                j < n
                and text[j] in "{["
                and not (text[i + len(name)].isalnum() or text[i + len(name)] == "_")
            ):
                end = _match(text, j)
                spans.append((i, end))
                i = end
                continue
        i += 1
    return spans


def _match(text: str, start: int) -> int:
    """Index just past the bracket matching ``text[start]``."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced brackets in config.pbtxt")


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    for start, end in reversed(spans):
        text = text[:start] + text[end:]
    return text


def is_ensemble(pbtxt: str) -> bool:
    """Ensembles take no instance_group and run no python code."""
    return re.search(r'^\s*platform\s*:\s*"ensemble"', pbtxt, re.M) is not None


def render_pbtxt(pbtxt: str, count: int, kind: str, params: dict[str, str]) -> str:
    """Return ``pbtxt`` with its instance_group replaced and ``params`` merged into its parameters.

    Existing parameters that ``params`` does not name are kept, so a model can
    ship its own constants in config.pbtxt.
    """
    if is_ensemble(pbtxt):
        return pbtxt
    text = _cut(pbtxt, _top_level_blocks(pbtxt, "instance_group"))
    spans = _top_level_blocks(text, "parameters")
    merged: dict[str, str] = {}
    for start, end in spans:
        for key, value in _PARAM_RE.findall(text[start:end]):
            merged[key] = value.replace('\\"', '"').replace("\\\\", "\\")
    merged.update(params)
    text = _cut(text, spans).rstrip() + "\n"
    text += f"\ninstance_group [ {{ count: {int(count)} kind: {kind} }} ]\n"
    for key, value in merged.items():
        value = str(value).replace("\\", "\\\\").replace('"', '\\"')
        text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    return text
