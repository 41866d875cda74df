"""``num_return_sequences`` = k > 1 in ``tensorrt_llm_bls``: one prefill, k decode sessions.

Why this shape: the prompt is the expensive part a request's sequences have in common, and
the prefill -> decode hand-off (``backend.serving.handoff``) is just tensors, so
``tensorrt_llm_bls`` computes the prompt once and gives the same hand-off to k decode
sessions, each importing it (no recompute; each session then holds its own copy of the
prompt KV in its slot, so k sequences take k of ``max_sessions``). Fanning the request out
to the ensemble instead would prefill the prompt k times: sessions admitted in the same
engine step all miss the prefix cache (``backend.engine.prefix_cache`` inserts a prompt's
blocks only once its prefill has finished).

What a client sees is what TensorRT-LLM's own backend sends for ``num_return_sequences``:
every response belongs to one sequence and says which in ``sequence_index`` (``[1, 1]``
INT32, only when k > 1), streaming and not; without streaming each sequence's whole text
comes in its own response (TensorRT-LLM answers one executor result per sequence, and its
``end_to_end_grpc_client.py`` files each response under ``sequence_index``). The final flag
goes out with the last sequence's last response.

Addressing: sequence i is the decode session ``<session_id>.<i>`` (own mailbox, own
reasoning, seed ``seed + i`` when the request is seeded, so sampled sequences differ yet
replay). The request's own ``session_id`` is registered here, by this model, as a mailbox
that forwards what it receives (``input``, ``cancel``) to every live sequence: a
``session_control`` cancel of the request, the BLS watcher's cancel on ``is_cancelled()``
and a failed sequence all stop all k sessions.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

from backend.serving.request import RequestConfig
from backend.serving.session_control import Mailbox, SessionNotFound
from backend.serving.tensors import Responder

#: One decode call's packets, decoded (``bls_wire.unpack``): deltas, then one ``final``.
Packets = Iterator[dict[str, Any]]


def sequence_session_id(session_id: str, index: int) -> str:
    """The decode session of sequence ``index`` of request ``session_id``."""
    return f"{session_id}.{index}"


def sequence_config(cfg: RequestConfig, index: int) -> RequestConfig:
    """The request as decode sees it for sequence ``index``: its own session id and seed."""
    seed = None if cfg.seed is None else (cfg.seed + index) & 0xFFFF_FFFF_FFFF_FFFF
    return dataclasses.replace(cfg, session_id=sequence_session_id(cfg.session_id, index), seed=seed)


class SequenceFanout:
    """Runs k decode calls of one request and merges their responses into its sender."""

    def __init__(self, out: Responder, mailbox: Mailbox, session_id: str, k: int, poll_s: float) -> None:
        self.out = out
        self.mailbox = mailbox
        self.session_id = session_id
        self.k = k
        self.poll_s = poll_s
        self.children = [sequence_session_id(session_id, i) for i in range(k)]
        self.lock = threading.Lock()
        self.ended: set[int] = set()
        self.error: str | None = None
        #: Mailbox messages still to deliver: ``[action, text, sequences not reached yet]``.
        self.pending: list[list[Any]] = []

    def run(
        self, decode: Callable[[int], Packets], tensors: Callable[[dict[str, Any], int], list[Any]]
    ) -> None:
        """``decode(i)``: sequence i's packets; ``tensors(obj, i)``: a packet's client tensors."""
        try:
            self.mailbox.register(self.session_id)
        except ValueError as e:
            self.out.finish(error=str(e))
            return
        threads = [
            threading.Thread(target=self._relay, args=(i, decode, tensors), name=f"bls-seq-{i}", daemon=True)
            for i in range(self.k)
        ]
        try:
            for t in threads:
                t.start()
            while alive := [t for t in threads if t.is_alive()]:
                self._forward()
                alive[0].join(self.poll_s)
        finally:
            self.mailbox.unregister(self.session_id)
        self.out.finish(error=self.error)  # no-op when the last sequence already ended it

    # ------------------------------------------------------------------ one sequence
    def _relay(
        self, i: int, decode: Callable[[int], Packets], tensors: Callable[[dict[str, Any], int], list[Any]]
    ) -> None:
        try:
            for obj in decode(i):
                if "error" in obj:
                    self._fail(i, str(obj["error"]))
                    return
                final = bool(obj.get("final"))
                with self.lock:  # sends and the "last one" decision under one lock: none after final
                    if final:
                        self.ended.add(i)
                    payload = tensors(obj, i)
                    last = len(self.ended) == self.k and self.error is None
                    if last:
                        self.out.finish(payload or None)
                    elif payload:
                        self.out.send(payload)
                if final:
                    return
        except Exception as e:  # noqa: BLE001 - one sequence's failure fails the request
            self._fail(i, f"tensorrt_llm_bls sequence {i} failed: {e!r}")
        finally:
            with self.lock:
                self.ended.add(i)

    def _fail(self, i: int, message: str) -> None:
        """Sequence ``i`` failed: remember why and cancel the others (their KV frees at once)."""
        with self.lock:
            self.ended.add(i)
            if self.error is None:
                self.error = message
            self.pending.append(["cancel", "", set(range(self.k)) - self.ended])

    # ------------------------------------------------------------------ the request's mailbox
    def _forward(self) -> None:
        """Messages to the request's session id -> every sequence still running.

        A sequence whose decode has not registered its session yet is tried again at the
        next poll; one that has ended is dropped.
        """
        with self.lock:
            for action, text in self.mailbox.poll(self.session_id):
                self.pending.append([action, text, set(range(self.k)) - self.ended])
            for msg in self.pending:
                action, text, todo = msg
                for i in sorted(todo):
                    try:
                        self.mailbox.post(self.children[i], action, text)
                        todo.discard(i)
                    except SessionNotFound:
                        if i in self.ended:
                            todo.discard(i)
                todo -= self.ended
            self.pending = [m for m in self.pending if m[2]]
