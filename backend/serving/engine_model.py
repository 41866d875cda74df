"""The skeleton of an engine-backed Triton model: initialize, execute, errors, finalize.

Why a base class: prefill, decode and reasoning each own one engine per instance, report
the same metrics, and (decode, reasoning) serve each decoupled request on its own thread.
Written once here, so each model is only what makes it different (:meth:`serve`).

The decoupled pattern is python_backend's ``examples/decoupled/repeat_model.py``:
``execute`` starts a thread per request and returns ``None`` at once; the thread sends
responses through the request's sender and the final flag last; ``finalize`` waits for
the threads still in flight (after asking them to stop: :attr:`EngineModel.closing`)
so no request is left without its final flag.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any

from backend.engine import EngineBusyError
from backend.serving import heartbeat
from backend.serving.bls_wire import responder_for
from backend.serving.crash_traces import enable_crash_traces
from backend.serving.instance import StatsPoller, build_engine
from backend.serving.metrics import ServingMetrics
from backend.serving.parameters import instance_parameters
from backend.serving.tensors import Responder

#: How long ``finalize`` waits for in-flight request threads before tearing down (s).
FINALIZE_WAIT_S = 5.0


def error_message(role: str, exc: BaseException) -> str:
    """The client-facing text of a failure; unexpected ones are also traced to the log.

    Bad requests (``ValueError`` / ``KeyError``, which name the field and the rule) and a
    busy engine are the client's to fix or retry: their message goes out as is. Anything
    else is a bug or an outage: prefixed with the model's role and printed with its trace.
    """
    if isinstance(exc, ValueError | KeyError | EngineBusyError):
        return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    traceback.print_exc()
    return f"{role} failed: {exc!r}"


class EngineModel:
    """Base of the Triton models that run an engine: one engine per instance.

    Subclasses set :attr:`role` and implement :meth:`serve` (decoupled models) or override
    :meth:`execute` (prefill, which answers in ``execute``). :meth:`setup` is the hook for
    what a model adds to :meth:`initialize`.
    """

    role = "engine"
    #: Period of the engine-stats gauges (s).
    stats_period = 0.25

    def initialize(self, args: dict[str, Any]) -> None:
        enable_crash_traces()
        heartbeat.start(args.get("model_instance_name", self.role))
        self.params = instance_parameters(args)
        self.engine = build_engine(args, role=self.role)
        self.tokenizer = self.engine.tokenizer
        self.vocab_size = self.engine.model.cfg.vocab_size
        self.group_tokens = max(1, int(self.params.get("response_group_tokens", "1")))
        self.metrics = ServingMetrics(self.role, args.get("model_instance_name", self.role))
        self.poller = StatsPoller(self.engine, self.metrics.engine_stats, period=self.stats_period)
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        #: Set by ``finalize``: request loops treat it as a cancel, so they end within a step.
        self.closing = threading.Event()
        self.setup(args)

    def setup(self, args: dict[str, Any]) -> None:
        """Model-specific initialisation, after the engine is up."""

    # ------------------------------------------------------------------ decoupled requests
    def execute(self, requests: list[Any]) -> list[Any] | None:
        for request in requests:
            with self._inflight_cv:
                self._inflight += 1
            threading.Thread(
                target=self._serve, args=(request,), name=f"{self.role}-request", daemon=True
            ).start()
        return None

    def responder(self, request: Any) -> Responder:
        """How this request's responses go out: to a BLS caller (decode calling reasoning,
        tensorrt_llm_bls calling decode) as objects over the reply channel (``bls_wire``)."""
        return responder_for(request)

    def _serve(self, request: Any) -> None:
        out = self.responder(request)
        try:
            self.serve(request, out)
        except Exception as e:  # noqa: BLE001 - every failure reaches the client
            self.fail(request, out, error_message(self.role, e))
        finally:
            out.finish()  # no-op when the request already ended: never a request without its final flag
            self.poller.poll_now()
            with self._inflight_cv:
                self._inflight -= 1
                self._inflight_cv.notify_all()

    def serve(self, request: Any, out: Responder) -> None:
        """Serves one request on its own thread; ends it through ``out``."""
        raise NotImplementedError

    def fail(self, request: Any, out: Responder, message: str) -> None:
        """Ends a request that raised; an error response unless the model knows better."""
        out.finish(error=message)

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Model-specific cleanup, after in-flight requests ended and before the engine stops."""

    def finalize(self) -> None:
        self.closing.set()
        deadline = time.monotonic() + FINALIZE_WAIT_S
        with self._inflight_cv:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cv.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.teardown()
        self.poller.stop()
        self.metrics.close()
        self.engine.shutdown()
