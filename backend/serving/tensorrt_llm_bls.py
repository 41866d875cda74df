"""Triton model ``tensorrt_llm_bls`` (decoupled): the ensemble's chain through BLS, as a model
that sees its client go away.

Why it exists: an ensemble cannot see a cancelled gRPC stream or a closed HTTP connection on
Triton 2.51 (the cancel stops at the ensemble; ``decode`` inside it never learns), so a
client that hangs up leaves its session generating until ``max_tokens``. A decoupled Python
model that is itself the client-facing model can: its response sender reports
``is_cancelled()`` (what vLLM's Triton backend checks every step). TensorRT-LLM ships exactly
such a model beside its ensemble, under this name, and its clients accept it by name
(``end_to_end_grpc_client.py --model-name tensorrt_llm_bls``).

Per request, on its own thread: ``preprocessing`` and ``prefill`` through BLS (``exec``),
then ``decode`` through decoupled BLS, its responses sent back as objects over the reply
channel (``backend/serving/reply_channel.py``: ordinary tensors of a decoupled BLS response
crash the caller on 2.51, and many responses through Triton's iterators can deadlock it) and
re-sent to the client with the ensemble's outputs and shapes
(``text_output`` one-dimensional, as TensorRT-LLM's). A watcher polls ``is_cancelled()``
every ``cancel_poll_ms`` and, on a cancel, posts ``cancel`` to the session's mailbox (a BLS
caller cannot cancel its decoupled callee on 2.51: reasoning_wire workaround 5). Posting rings
the mailbox's doorbell, a datagram to the decode process that owns the session
(``backend/serving/session_control.py``), so decode hands the cancel to its engine at once
rather than at its next poll: the session ends within one engine step and frees the KV. The session id is chosen here when the
client sends none, so the watcher knows it before decode starts.

``num_return_sequences`` k > 1 goes through as the ensemble serves it: decode runs the k
answers as k output streams of one engine session sharing the prompt KV, each response
tagged ``sequence_index`` (``backend/serving/decode.py``); a cancel of the request's session
id stops all k, since they are one session.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np

from backend.serving import heartbeat
from backend.serving.crash_traces import enable_crash_traces
from backend.serving.hop_trace import cancel_hop
from backend.serving.parameters import instance_parameters
from backend.serving.reply_channel import CallEnded, ChannelCall, DeferredRelease
from backend.serving.request import INPUTS, RequestError
from backend.serving.session_control import Mailbox, SessionNotFound
from backend.serving.session_ids import mint_session_id
from backend.serving.tensors import ONE_D_OUTPUTS, Responder
from backend.serving.top_logprobs import OUTPUTS as TOP_OUTPUTS
from backend.serving.top_logprobs import from_flat as top_from_flat

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: decode's output -> this model's (an output may not share an input's name in the ensemble;
#: the same name here keeps the two client-facing models interchangeable).
RENAMED = {"session_id": "output_session_id"}
#: Outputs re-sent as ``[1, n]`` integers / floats; the rest are strings.
INT_OUTPUTS = ("output_ids", "num_input_tokens", "sequence_index")
FLOAT_OUTPUTS = ("timing_ms", "channel_stats", "output_log_probs", "cum_log_probs")
#: How often the watcher asks the sender whether the client went away (ms).
CANCEL_POLL_MS = 20.0


def client_tensors(obj: dict[str, Any]) -> list[Any]:
    """One decoded decode packet -> the client's tensors, in the ensemble's shapes."""
    out = []
    for name, value in obj.items():
        if name == "final":
            continue
        name = RENAMED.get(name, name)
        if name == "output_log_probs":  # [batch, beam, tokens], as TensorRT-LLM's
            arr = np.array(value, dtype=np.float32).reshape(1, 1, -1)
        elif name in TOP_OUTPUTS:  # [batch, beam, tokens, k]
            arr = top_from_flat(name, value, len(obj.get("output_log_probs") or []))
        elif name in INT_OUTPUTS:
            arr = np.array([value], dtype=np.int32).reshape(1, -1)
        elif name in FLOAT_OUTPUTS:
            arr = np.array([value], dtype=np.float32).reshape(1, -1)
        elif name in ONE_D_OUTPUTS:
            arr = np.array([v.encode("utf-8") for v in value] or [b""], dtype=np.object_)
        else:
            arr = np.array([[v.encode("utf-8") for v in value] or [b""]], dtype=np.object_)
        out.append(pb_utils.Tensor(name, arr))
    return out


class TensorrtLlmBlsModel:
    """The decoupled client-facing model; one thread per request, no engine of its own."""

    def initialize(self, args: dict[str, Any]) -> None:
        enable_crash_traces()  # it reads decoupled BLS responses: reasoning_wire's workaround 1
        heartbeat.start(args.get("model_instance_name", "tensorrt_llm_bls"))  # and can deadlock on them
        params = instance_parameters(args)
        self.models = {
            step: params.get(f"{step}_model", step) for step in ("preprocessing", "prefill", "decode")
        }
        self.poll_s = float(params.get("cancel_poll_ms", str(CANCEL_POLL_MS))) / 1000.0
        self.mailbox = Mailbox.for_args(args)
        self.release_later = DeferredRelease()
        self.closing = threading.Event()
        self._threads: set[threading.Thread] = set()
        #: Cancels seen (``is_cancelled``) since start, for the probe (bench/cancel_probe.py).
        self.cancels_seen = 0

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            t = threading.Thread(target=self._serve, args=(request,), name="bls-request", daemon=True)
            self._threads.add(t)
            t.start()
        return None

    # ------------------------------------------------------------------ one request
    def _serve(self, request: Any) -> None:
        out = Responder(request)
        done = threading.Event()
        try:
            sid, inputs = self._inputs(request)
            threading.Thread(
                target=self._watch, args=(out, sid, done), name="bls-cancel", daemon=True
            ).start()
            pre = self._exec("preprocessing", inputs, ["input_ids", "request_json"])
            if out.cancelled():
                out.finish(error="cancelled by the client")
                return
            ids, rj = (pb_utils.get_output_tensor_by_name(pre, n) for n in ("input_ids", "request_json"))
            pf = self._exec("prefill", [ids, rj], ["prompt_kv", "prompt_logits"])
            kv, logits = (pb_utils.get_output_tensor_by_name(pf, n) for n in ("prompt_kv", "prompt_logits"))
            if out.cancelled():  # hung up during prefill: no decode session at all
                out.finish(error="cancelled by the client")
                return
            self._relay(out, [ids, rj, kv, logits])
        except (_StepError, RequestError) as e:
            out.finish(error=str(e))
        except Exception as e:  # noqa: BLE001 - every failure reaches the client
            traceback.print_exc()
            out.finish(error=f"tensorrt_llm_bls failed: {e!r}")
        finally:
            done.set()
            out.finish()
            self._threads.discard(threading.current_thread())

    def _inputs(self, request: Any) -> tuple[str, list[Any]]:
        """The client's inputs for ``preprocessing``, with a session id chosen here if none."""
        inputs = []
        sid = ""
        batch = 1
        for name in INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                continue
            if name == "text_input":
                batch = max(1, int(t.as_numpy().shape[0]))
            if name == "session_id":
                v = t.as_numpy().reshape(-1)
                sid = (
                    (v[0].decode("utf-8", "replace") if isinstance(v[0], bytes) else str(v[0]))
                    if v.size
                    else ""
                )
            inputs.append(t)
        if not sid:
            sid = mint_session_id()  # as preprocessing would: the replica's name, for routing
            # Shaped like the batch, so that preprocessing's own rule (one prompt per request)
            # is what answers a batch, with the ensemble's message.
            ids = np.array([[sid.encode()]] * batch, dtype=np.object_)
            inputs.append(pb_utils.Tensor("session_id", ids))
        return sid, inputs

    def _exec(self, step: str, inputs: list[Any], outputs: list[str]) -> Any:
        resp = pb_utils.InferenceRequest(
            model_name=self.models[step], requested_output_names=outputs, inputs=inputs
        ).exec()
        if resp.has_error():
            raise _StepError(resp.error().message())
        return resp

    def _packets(self, inputs: list[Any]) -> Iterator[dict[str, Any]]:
        """One decode call's response objects, in order; a failure as ``{"error": message}``.

        They come over the reply channel (``reply_channel``): Triton carries only the call's
        flags-only final response, so this stub cannot deadlock on its response iterators.
        """
        q: queue.Queue[Any] = queue.Queue()
        ChannelCall(q.put).start(self.models["decode"], inputs, self.release_later, name="bls-decode")
        while True:
            item = q.get()
            if isinstance(item, CallEnded):
                if item.message:
                    yield {"error": item.message}
                return
            yield item

    def _relay(self, out: Responder, inputs: list[Any]) -> None:
        """decode's packets -> the client's responses, the final flag on the last one."""
        for obj in self._packets(inputs):
            if "error" in obj:
                out.finish(error=obj["error"])
            elif obj.get("final"):
                tensors = client_tensors(obj)
                out.finish(tensors if len(tensors) else None)
            else:
                out.send(client_tensors(obj))

    def _watch(self, out: Responder, sid: str, done: threading.Event) -> None:
        """Polls ``is_cancelled()``; a cancel becomes the session's mailbox ``cancel``."""
        while not done.wait(self.poll_s):
            if not (out.cancelled() or self.closing.is_set()):
                continue
            self.cancels_seen += 1
            cancel_hop(sid, "bls_seen")
            while not done.is_set():  # decode may not have registered the session yet
                try:
                    self.mailbox.post(sid, "cancel")
                    return
                except SessionNotFound:
                    done.wait(self.poll_s)
            return

    def finalize(self) -> None:
        self.closing.set()
        deadline = time.monotonic() + 5.0
        for t in list(self._threads):
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.release_later.clear()


class _StepError(Exception):
    """A BLS step answered with an error: its message goes to the client as is."""
