"""Locust user that drives the gRPC streaming API through ``client.MultiStreamClient``.

Request events (request_type "grpc"), so locust's stats separate what matters
for a multi-stream model:

- ``ttft_output``    time to the first user-facing token (fired once per request)
- ``ttft_reasoning`` time to the first token of each reasoning stream
- ``inter_token``    gap between consecutive user-facing deltas (the I/O loop's
                     smoothness while reasoning runs in the background)
- ``full_response``  whole request; fails on any error, a missing final flag, or
                     an empty answer

Settings come from the environment (the ``python -m load`` runner sets them):
MULTISTREAM_MAX_TOKENS (32), MULTISTREAM_REASONING_STREAMS (1),
MULTISTREAM_REASONING_BUDGET (32), MULTISTREAM_TEMPERATURE (unset = greedy),
MULTISTREAM_URL (used when locust gets no --host).
"""

from __future__ import annotations

# gRPC must be switched to gevent before any channel exists, or a blocking
# stream read would freeze every simulated user (locust's gRPC docs pattern).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from locust import User, constant, constant_pacing, task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # locust -f from anywhere

from client import Done, MultiStreamClient, MultiStreamError, StreamDelta  # noqa: E402

PROMPTS: list[str] = json.loads((Path(__file__).parent / "prompts.json").read_text(encoding="utf-8"))


def _env_int(name: str, default: int | None) -> int | None:
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def _env_float(name: str) -> float | None:
    v = os.environ.get(name)
    return None if v in (None, "") else float(v)


class MultiStreamUser(User):
    """One simulated user: sends a random bundled prompt, reads the whole stream, repeats."""

    # MULTISTREAM_PACING_S: one request per user every that many seconds (a steady arrival
    # rate for soak runs, bench.soak); unset: back to back (maximum load).
    wait_time = (
        constant_pacing(float(os.environ["MULTISTREAM_PACING_S"]))
        if os.environ.get("MULTISTREAM_PACING_S")
        else constant(0)
    )

    def on_start(self) -> None:
        url = self.host or os.environ.get("MULTISTREAM_URL") or "localhost:8001"
        self.client = MultiStreamClient(url, "grpc", idle_timeout_s=120.0)
        self.max_tokens = _env_int("MULTISTREAM_MAX_TOKENS", 32)
        self.reasoning_streams = _env_int("MULTISTREAM_REASONING_STREAMS", 1)
        self.reasoning_budget = _env_int("MULTISTREAM_REASONING_BUDGET", 32)
        self.temperature = _env_float("MULTISTREAM_TEMPERATURE")

    def on_stop(self) -> None:
        self.client.close()

    def _fire(self, name: str, seconds: float, length: int = 0, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=exc,
            context={},
        )

    @task
    def generate(self) -> None:
        prompt = random.choice(PROMPTS)
        t0 = time.perf_counter()
        first: dict[str, float] = {}
        last_output_t: float | None = None
        done: Done | None = None
        try:
            gen = self.client.generate(
                prompt,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                reasoning_streams=self.reasoning_streams,
                reasoning_budget=self.reasoning_budget if self.reasoning_streams else None,
            )
            for ev in gen:
                if isinstance(ev, Done):
                    done = ev
                    continue
                assert isinstance(ev, StreamDelta)
                if not (ev.text or ev.token_ids) or ev.kind == "input":
                    continue
                is_answer = ev.stream == "output"
                if ev.stream not in first:
                    first[ev.stream] = ev.t_received
                    if is_answer or ev.kind == "reasoning":
                        name = "ttft_output" if is_answer else "ttft_reasoning"
                        self._fire(name, ev.t_received - t0, len(ev.token_ids))
                if is_answer:
                    if last_output_t is not None:
                        self._fire("inter_token", ev.t_received - last_output_t, len(ev.token_ids))
                    last_output_t = ev.t_received
            if done is None:
                raise MultiStreamError("stream ended without a Done event")
            if not done.output_text.strip():
                raise MultiStreamError("empty user-facing output")
            self._fire("full_response", time.perf_counter() - t0, sum(done.tokens.values()))
        except Exception as exc:  # noqa: BLE001 - every failure must become a locust failure
            self._fire("full_response", time.perf_counter() - t0, 0, exc)
            time.sleep(0.5)  # gevent-patched; a dead server must not become a busy loop on shared cores
