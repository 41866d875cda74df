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
import threading
from typing import Any

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (linting, unit tests)
    pb_utils = None

log = logging.getLogger(__name__)

TTFT_BUCKETS_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
#: How often the flusher thread pushes recorded values to Triton (s): /metrics lags by this.
FLUSH_PERIOD_S = 0.5
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
    # Cumulative since the instance started (gauges, as they are read from Engine.stats()):
    # hit rate = hit_tokens / lookup_tokens.
    "prefix_lookup": (
        "multistream_prefix_cache_lookup_tokens",
        "Prompt tokens the prefix cache was asked for (whole blocks before the last row), since start",
        "GAUGE",
    ),
    "prefix_hit": (
        "multistream_prefix_cache_hit_tokens",
        "Prompt tokens whose KV came from the prefix cache instead of a prefill, since start",
        "GAUGE",
    ),
    "prefix_bytes": (
        "multistream_prefix_cache_bytes",
        "Memory the prefix cache holds in this instance",
        "GAUGE",
    ),
    # Why: a session that leaks its thread (decode loop, BLS consumer) shows nowhere else;
    # after a cancellation storm this must return to its idle value.
    "threads": ("multistream_threads", "Python threads alive in this instance's stub process", "GAUGE"),
}


class ServingMetrics:
    """The metrics of one model instance; every method is a cheap no-op outside Triton."""

    def __init__(self, model: str, instance: str):
        self.model = model
        self.instance = instance
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple, Any] = {}
        # Every metric call is an IPC round trip from the stub to the server, and metric
        # calls from several threads crash tritonserver 2.51 (SIGSEGV / std::bad_alloc in
        # libtriton_python.so) even when serialised by a lock: measured with 6 concurrent
        # requests with reasoning, 1 crash in 3 runs with the lock, 0 in 6 with metrics off.
        # So session threads only record into local buffers, and ONE flusher thread per
        # process makes all metric IPC. It also takes the per-token IPC off the hot path.
        self._lock = threading.Lock()
        self._pending: dict[tuple, tuple[str, list[float] | None, list[float]]] = {}
        self._flush_wake = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
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

    def _apply(
        self, key: str, labels: dict[str, str], op: str, value: float, buckets: list[float] | None = None
    ) -> None:
        """Records locally; the flusher thread sends it to Triton."""
        if not self._families:
            return
        ident = (key, tuple(sorted(labels.items())))
        with self._lock:
            _, _, values = self._pending.setdefault(ident, (op, buckets, []))
            if op == "set":
                values[:] = [float(value)]
            else:
                values.append(float(value))
            start = self._flusher is None and not self._closed
            if start:
                self._flusher = threading.Thread(target=self._flush_loop, name="metrics-flush", daemon=True)
        if start:
            self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._closed:
            self._flush_wake.wait(FLUSH_PERIOD_S)
            self._flush_wake.clear()
            if not self._closed:
                self.flush()

    def close(self) -> None:
        """Stops metric IPC for good; call from the model's ``finalize``.

        A metric call while the stub tears down dereferences its freed shared-memory pool
        (SIGSEGV in ``Metric::SaveToSharedMemory``, seen in the kernel log of this machine),
        so the flusher must be stopped and joined before the stub finalizes.
        """
        with self._lock:
            self._closed = True
            flusher = self._flusher
        self._flush_wake.set()
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=5)
        # Drop the metric objects now, while the stub's shared memory still exists: their
        # destructors make IPC, and run at interpreter teardown they crash in
        # ``MetricFamily::SaveToSharedMemory`` and leave the stub's /dev/shm region behind.
        with self._lock:
            self._metrics.clear()
            self._families.clear()

    def flush(self) -> None:
        """Sends what was recorded since the last flush (the flusher thread calls this)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for (key, label_items), (op, buckets, values) in pending.items():
            try:
                m = self._metric(key, dict(label_items), buckets)
                if m is None:
                    continue
                if op == "increment":
                    m.increment(sum(values))
                else:
                    for v in values:
                        getattr(m, op)(v)
            except Exception as e:  # noqa: BLE001 - metrics must never break serving
                log.warning("metric %s: %s", key, e)

    def ttft(self, stream_kind: str, ms: float) -> None:
        labels = {"model": self.model, "stream_kind": stream_kind}
        self._apply("ttft", labels, "observe", max(0.0, ms), TTFT_BUCKETS_MS)

    def inter_token(self, stream_kind: str, ms: float) -> None:
        labels = {"model": self.model, "stream_kind": stream_kind}
        self._apply("itl", labels, "observe", max(0.0, ms), ITL_BUCKETS_MS)

    def tokens(self, stream_kind: str, count: int) -> None:
        if count > 0:
            self._apply("tokens", {"model": self.model, "stream_kind": stream_kind}, "increment", count)

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
            ("prefix_lookup", stats.get("prefix_cache_lookup_tokens", 0)),
            ("prefix_hit", stats.get("prefix_cache_hit_tokens", 0)),
            ("prefix_bytes", stats.get("prefix_cache_bytes", 0)),
            ("threads", threading.active_count()),
        ):
            self._apply(key, labels, "set", value)
