"""Custom Prometheus metrics on Triton's ``/metrics``, next to the ``nv_inference_*`` ones.

Why custom metrics: Triton's own counters see requests, not tokens or streams. A
multi-stream server is judged by time to first token of the *user-facing* stream while
reasoning runs, inter-token latency, tokens per stream kind, and KV-cache pressure; those
only the models know. Families are created through ``pb_utils.MetricFamily`` in every
instance (Triton merges families of the same name); gauges carry the instance name so
instances do not overwrite each other, counters and histograms aggregate.
"""

from __future__ import annotations

import logging
from typing import Any

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (linting, unit tests)
    pb_utils = None

log = logging.getLogger(__name__)

TTFT_BUCKETS_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
ITL_BUCKETS_MS = [5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 5000]

FAMILIES = {
    "ttft": (
        "multistream_time_to_first_token_ms",
        "Time from request arrival to a stream's first token (ms)",
        "HISTOGRAM",
    ),
    "itl": (
        "multistream_inter_token_latency_ms",
        "Time between consecutive tokens of one stream (ms)",
        "HISTOGRAM",
    ),
    "tokens": ("multistream_generated_tokens_total", "Tokens generated, by stream kind", "COUNTER"),
    "active": ("multistream_active_sessions", "Engine sessions running or queued in this instance", "GAUGE"),
    "kv_used": ("multistream_kv_cache_used_tokens", "KV-cache positions in use in this instance", "GAUGE"),
    "kv_capacity": (
        "multistream_kv_cache_capacity_tokens",
        "KV-cache positions reserved in this instance",
        "GAUGE",
    ),
    "kv_util": ("multistream_kv_cache_utilization", "Fraction of KV-cache positions in use (0..1)", "GAUGE"),
}


class ServingMetrics:
    """The metrics of one model instance; every method is a cheap no-op outside Triton."""

    def __init__(self, model: str, instance: str):
        self.model = model
        self.instance = instance
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple, Any] = {}
        if pb_utils is None:
            return
        try:
            for key, (name, desc, kind) in FAMILIES.items():
                self._families[key] = pb_utils.MetricFamily(
                    name=name, description=desc, kind=getattr(pb_utils.MetricFamily, kind)
                )
        except Exception as e:  # noqa: BLE001 - a metrics failure must not stop the model
            log.warning("custom metrics disabled: %s", e)
            self._families.clear()

    def _metric(self, key: str, labels: dict[str, str], buckets: list[float] | None = None) -> Any:
        family = self._families.get(key)
        if family is None:
            return None
        ident = (key, tuple(sorted(labels.items())))
        metric = self._metrics.get(ident)
        if metric is None:
            kw: dict[str, Any] = {"labels": labels}
            if buckets is not None:
                kw["buckets"] = [float(b) for b in buckets]
            metric = self._metrics[ident] = family.Metric(**kw)
        return metric

    def ttft(self, stream_kind: str, ms: float) -> None:
        m = self._metric("ttft", {"model": self.model, "stream_kind": stream_kind}, TTFT_BUCKETS_MS)
        if m is not None:
            m.observe(max(0.0, float(ms)))

    def inter_token(self, stream_kind: str, ms: float) -> None:
        m = self._metric("itl", {"model": self.model, "stream_kind": stream_kind}, ITL_BUCKETS_MS)
        if m is not None:
            m.observe(max(0.0, float(ms)))

    def tokens(self, stream_kind: str, count: int) -> None:
        m = self._metric("tokens", {"model": self.model, "stream_kind": stream_kind})
        if m is not None and count > 0:
            m.increment(float(count))

    def engine_stats(self, stats: dict) -> None:
        """Gauges from ``Engine.stats()``."""
        labels = {"model": self.model, "instance": self.instance}
        active = stats.get("active_sessions", 0) + stats.get("queued_sessions", 0)
        used = stats.get("kv_used_tokens", 0)
        cap = stats.get("kv_capacity_tokens", 0)
        for key, value in (
            ("active", active),
            ("kv_used", used),
            ("kv_capacity", cap),
            ("kv_util", used / cap if cap else 0.0),
        ):
            m = self._metric(key, labels)
            if m is not None:
                m.set(float(value))
