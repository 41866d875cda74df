"""The front's own Prometheus metrics (``GET /metrics``), next to Triton's on its port 8002.

Why its own: Triton counts requests to the ensemble; only the front sees what its clients
see: HTTP status per endpoint, the time to the first answer token over HTTP, requests in
flight (which must return to 0 once every client has gone, disconnects included).
One registry per app, so tests that build several apps do not share counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FrontMetrics:
    """Counters, the TTFT histogram and the in-flight gauge of one front."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "multistream_front_requests",
            "HTTP requests answered by the OpenAI front, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "multistream_front_errors",
            "Error responses (and errors inside a started stream), by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "multistream_front_time_to_first_token_seconds",
            "From the request reaching the front to its first answer token leaving for the client",
            ["endpoint"],
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "multistream_front_inflight_requests",
            "Generations running through the front (0 when idle)",
            registry=self.registry,
        )
        self.cancelled = Counter(
            "multistream_front_cancelled",
            "Generations cancelled by a client disconnect or a cancel endpoint",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
