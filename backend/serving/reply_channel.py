"""The reply channel: how a decoupled BLS callee streams its data back to its caller.

Why not through the BLS response iterator (Triton 2.51, python backend r24.10): the stub can
deadlock when several decoupled BLS calls are live in one process and one more starts
(docs/reliability.md, "A stub that deadlocks"). gdb showed three locks in a cycle:

- a thread woken in ``ResponseIterator::Next`` re-takes the GIL while it holds that
  iterator's mutex;
- ``ParentToStubMQMonitor`` holds the iterator map's mutex while it waits for that iterator's
  mutex, to enqueue the iterator's *next* response;
- a thread starting another decoupled call holds the GIL and waits for the map's mutex
  (``Stub::GetResponseIterator``).

The cycle needs an iterator that gets a second response while the thread woken by the first
still waits for the GIL. So a caller here gets exactly one response through Triton, the
flags-only final one (or Triton's own error), and everything else arrives through this
channel: the monitor then never waits for an iterator's mutex that a woken reader holds, and
any number of calls may start at any time.

The channel: one Unix datagram socket per caller process (:class:`Inbox`, Linux's abstract
namespace, like the session doorbell), its address and a call id sent as the request
parameter :data:`REPLY_TO`. The callee sends each response as one JSON datagram
(:func:`deliver`; split into fragments past :data:`MAX_DATAGRAM`), then an end mark, and only
then its flags-only final response through Triton. One socket per caller means one receive
queue: the end mark, sent before the final response, is read after every datagram sent before
it, so :class:`ChannelCall` hands its caller a :class:`CallEnded` strictly after the last data
response. Datagrams on a Unix socket are neither lost nor reordered; a sender blocks while the
caller's queue is full (:data:`SEND_TIMEOUT_S`, then the caller counts as gone).

Decode uses it to read ``reasoning``; ``tensorrt_llm_bls`` uses it to read ``decode``. Light:
no torch, no numpy.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.serving.packet import PACKET
from backend.serving.session_control import ring, sockaddr

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: The request parameter that names where the callee sends its data: ``"<address> <call id>"``.
REPLY_TO = "multistream_reply_to"
#: Every inbox address starts so; a callee sends to nothing else (a client that sets the
#: parameter cannot aim the server's datagrams at another socket of the host).
ADDRESS_PREFIX = "@multistream-reply-"
#: Largest payload in one datagram (bytes); longer responses go as fragments.
MAX_DATAGRAM = 60_000
#: How long a callee's send may wait for a full caller queue before the caller counts as gone.
SEND_TIMEOUT_S = 10.0
#: After the final BLS response, how long a caller waits for the end mark still in flight.
END_GRACE_S = 5.0

_WHOLE, _MORE, _LAST, _END = b"D", b"F", b"L", b"E"


@dataclass(frozen=True)
class CallEnded:
    """The last item of every call: ``message`` is empty when it ended as it should."""

    message: str


class DeferredRelease:
    """Holds objects for ``delay_s`` seconds, then drops them on a thread that has the GIL.

    Why (Triton 2.51): once the final response is read, the stub's
    ``ServiceStubToParentRequests`` thread erases the response iterator from its map
    (``Stub::SendCleanupId``); if Python had already dropped it, that erase frees the
    iterator and its tensors off the GIL (caught by ``tests/support/gil_check.c``). Holding
    ours for ``delay_s`` (far beyond the milliseconds that takes) makes ours the last
    reference, released here by whichever Python thread calls :meth:`keep` or :meth:`sweep`.
    """

    def __init__(self, delay_s: float = 30.0):
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._held: collections.deque[tuple[float, Any]] = collections.deque()

    def keep(self, obj: Any) -> None:
        with self._lock:
            self._held.append((time.monotonic() + self.delay_s, obj))
        self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Drops what is due; returns how many objects are still held."""
        now = time.monotonic() if now is None else now
        due = []
        with self._lock:
            while self._held and self._held[0][0] <= now:
                due.append(self._held.popleft())
            left = len(self._held)
        due.clear()  # the references go here, in a Python thread, outside the lock
        return left

    def clear(self) -> None:
        """Drops everything (model finalize: the stub's threads are done by then)."""
        with self._lock:
            held, self._held = self._held, collections.deque()
        held.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


# ----------------------------------------------------------------------------- wire
def frames(call: str, obj: Any) -> list[bytes]:
    """The datagrams that carry ``obj`` for ``call``: one, or fragments of a long one."""
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head = call.encode() + b" "
    if len(raw) <= MAX_DATAGRAM:
        return [head + _WHOLE + raw]
    parts = [raw[i : i + MAX_DATAGRAM] for i in range(0, len(raw), MAX_DATAGRAM)]
    return [head + (_LAST if i == len(parts) - 1 else _MORE) + p for i, p in enumerate(parts)]


def end_frame(call: str) -> bytes:
    return call.encode() + b" " + _END


def parse_target(value: str) -> tuple[str, str] | None:
    """``"<address> <call id>"`` -> (address, call id); None if it is not an inbox's."""
    address, _, call = str(value).partition(" ")
    if not address.startswith(ADDRESS_PREFIX) or not call or " " in call or len(address) > 100:
        return None
    return address, call


def reply_target(request: Any) -> tuple[str, str] | None:
    """Where this request's data go, if its caller asked for the channel (the parameter)."""
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):
        return None
    value = params.get(REPLY_TO) if isinstance(params, dict) else None
    return parse_target(value) if isinstance(value, str) else None


class _Sender:
    """The callee process's one sending socket (thread-safe: one datagram per ``sendto``;
    a fragmented response holds the lock so that its fragments go out back to back)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(SEND_TIMEOUT_S)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        except OSError:  # pragma: no cover - the default buffer still carries a fragment
            pass
        self.lock = threading.Lock()

    def send(self, address: str, datagrams: list[bytes]) -> bool:
        try:
            if len(datagrams) == 1:
                self.sock.sendto(datagrams[0], sockaddr(address))
                return True
            with self.lock:
                for d in datagrams:
                    self.sock.sendto(d, sockaddr(address))
            return True
        except OSError:  # the caller's socket is gone (ECONNREFUSED) or stuck past the timeout
            return False


_sender: _Sender | None = None
_sender_lock = threading.Lock()


def deliver(target: tuple[str, str], obj: Any | None) -> bool:
    """Sends ``obj`` (or, for None, the end mark) to ``target``; False once the caller is gone."""
    global _sender
    if _sender is None:  # once per process: no lock on the per-token path after that
        with _sender_lock:
            if _sender is None:
                _sender = _Sender()
    address, call = target
    return _sender.send(address, [end_frame(call)] if obj is None else frames(call, obj))


# ----------------------------------------------------------------------------- caller
class Inbox:
    """The caller process's socket: datagrams -> the handler of their call, in order.

    One receiving thread; handlers run on it and must be quick (decode's only posts into a
    session's queue). A datagram of a call nobody waits for (it ended) is dropped.
    """

    _shared: Inbox | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.address = f"{ADDRESS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(sockaddr(self.address))
        self._lock = threading.Lock()
        #: call id -> (its objects' handler, its end mark's handler)
        self._calls: dict[str, tuple[Callable[[Any], None], Callable[[], None]]] = {}
        self._partial: dict[str, list[bytes]] = {}
        self._thread = threading.Thread(target=self._run, name="reply-inbox", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> Inbox:
        """This process's inbox, opened on first use (abstract sockets: Linux only)."""
        if not sys.platform.startswith("linux"):  # pragma: no cover
            raise RuntimeError("the reply channel needs Linux (abstract Unix sockets)")
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def open(self, on_item: Callable[[Any], None], on_end: Callable[[], None]) -> str:
        """A new call id: its data go to ``on_item``, its end mark to ``on_end``."""
        call = uuid.uuid4().hex[:16]
        with self._lock:
            self._calls[call] = (on_item, on_end)
        return call

    def close_call(self, call: str) -> None:
        with self._lock:
            self._calls.pop(call, None)
            self._partial.pop(call, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_DATAGRAM + 64)
            except OSError:
                return
            if not data:
                return  # close()
            try:
                self._dispatch(data)
            except Exception:  # noqa: BLE001 - one bad datagram never stops the inbox
                traceback.print_exc()

    def _dispatch(self, data: bytes) -> None:
        call_b, _, rest = data.partition(b" ")
        call, kind, payload = call_b.decode("ascii", "replace"), rest[:1], rest[1:]
        with self._lock:
            handlers = self._calls.get(call)
            if handlers is None:
                return  # the call has ended: a late datagram is dropped
            if kind in (_MORE, _LAST):
                self._partial.setdefault(call, []).append(payload)
                if kind == _MORE:
                    return
                payload = b"".join(self._partial.pop(call))
        on_item, on_end = handlers
        if kind == _END:
            on_end()
        else:
            on_item(json.loads(payload))

    def close(self) -> None:
        ring(self.address, "")  # an empty datagram ends the thread's recv (as the doorbell's)
        self._thread.join(timeout=1.0)
        self._sock.close()


class ChannelCall:
    """One decoupled BLS call whose data come over the reply channel.

    ``on_item`` gets every response object (a dict, on the inbox's thread), then exactly one
    :class:`CallEnded`: with an empty message once the end mark and the final BLS response
    are both in; with Triton's error, or with a note that the end mark never came (a callee
    whose sends failed), otherwise. A callee that dies never ends its BLS call (Triton 2.51):
    the caller's own watchdog must cover that, as before.
    """

    def __init__(self, on_item: Callable[[Any], None], inbox: Inbox | None = None):
        self.inbox = inbox or Inbox.shared()
        self._on_item = on_item
        self._end = threading.Event()
        self.call = self.inbox.open(on_item, self._end.set)

    @property
    def target(self) -> str:
        """The :data:`REPLY_TO` value of this call."""
        return f"{self.inbox.address} {self.call}"

    def start(
        self, model_name: str, inputs: list[Any], release: DeferredRelease, name: str = "bls-call"
    ) -> None:
        """Starts the BLS call on a daemon thread; returns at once."""
        threading.Thread(target=self._run, args=(model_name, inputs, release), name=name, daemon=True).start()

    def _run(self, model_name: str, inputs: list[Any], release: DeferredRelease) -> None:
        self.finish(self._exec(model_name, inputs, release), model_name)

    def _exec(self, model_name: str, inputs: list[Any], release: DeferredRelease) -> str:
        """The BLS call itself, read to its end: Triton's error message, or empty."""
        responses = None
        error = ""
        try:
            bls = pb_utils.InferenceRequest(
                model_name=model_name,
                requested_output_names=[PACKET],
                inputs=inputs,
                parameters={REPLY_TO: self.target},
            )
            responses = bls.exec(decoupled=True)
            for resp in responses:  # the final flags-only response, or Triton's error
                if resp.has_error():
                    error = error or resp.error().message()
        except Exception as e:  # noqa: BLE001 - reported to the caller, never a hang
            error = f"{model_name} call failed: {e}"
        finally:
            if responses is not None:
                release.keep(responses)  # Python drops it last, with the GIL (DeferredRelease)
                responses = None
        return error

    def finish(self, error: str, model_name: str = "the callee") -> None:
        """Once Triton's final response is in: waits for the end mark (still in the inbox's
        queue, behind the last objects) unless the call failed, then posts the CallEnded."""
        if not error and not self._end.wait(END_GRACE_S):
            error = f"{model_name} ended without its end mark (its replies could not be sent)"
        self.inbox.close_call(self.call)
        self._on_item(CallEnded(error))
