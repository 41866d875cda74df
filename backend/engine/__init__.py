"""The multi-stream engine (nano-vllm's shape: a scheduler that touches no tensors, a
model that runs one packed forward per step, and a thin thread-safe front).

- ``config``: :class:`EngineConfig` and how ``auto`` settings resolve;
- ``session``: sessions, streams, :class:`StreamEvent`, the paper's :class:`GridRules`;
- ``scheduler``: ``schedule() -> StepPlan`` and ``update(plan, sampled)``;
- ``batch``: ``pack(plan, pool)`` and the attention mask as a pure function;
- ``output``: stop rules, incremental text and hold-back per stream;
- ``sampling``: per-stream sampling; ``kv_cache``: the KV slot pool;
- ``engine``: the thread-safe front and the step loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.lazy import lazy_exports

if TYPE_CHECKING:
    from backend.engine.config import EngineConfig, resolve_dtype
    from backend.engine.engine import Engine, PrefixKV
    from backend.engine.errors import CacheFullError, ContextLengthError, EngineBusyError, EngineError
    from backend.engine.sampling_params import SamplingParams
    from backend.engine.session import GridRules, Prefix, StreamEvent, StreamSpec

_HOMES = {
    "EngineConfig": "config",
    "resolve_dtype": "config",
    "Engine": "engine",
    "PrefixKV": "engine",
    "CacheFullError": "errors",
    "ContextLengthError": "errors",
    "EngineBusyError": "errors",
    "EngineError": "errors",
    "SamplingParams": "sampling_params",
    "GridRules": "session",
    "Prefix": "session",
    "StreamEvent": "session",
    "StreamSpec": "session",
}
__getattr__ = lazy_exports(__name__, _HOMES)  # torch only when an engine name is used


__all__ = [
    "CacheFullError",
    "ContextLengthError",
    "Engine",
    "EngineBusyError",
    "EngineConfig",
    "EngineError",
    "GridRules",
    "Prefix",
    "PrefixKV",
    "SamplingParams",
    "StreamEvent",
    "StreamSpec",
    "resolve_dtype",
]
