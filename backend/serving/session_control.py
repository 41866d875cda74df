"""Input and cancel for a running session, from any connection (CONTRACTS §4).

Why a mailbox directory: the session lives in one ``decode`` instance (a process of its
own), and Triton may route a ``session_control`` request to any process. A directory per
live session (``<root>/<session_id>/``) is visible to all of them without a broker:
``session_control`` drops one file per message (written under a dot-name, then renamed,
so a reader never sees half a message) and then rings the owner's :class:`Doorbell`, which
wakes the session's decode loop at once; the loop also polls its directory every step, so a
lost ring only costs that step. The directory exists exactly while the session runs, so an
unknown or ended session is an immediate, clear error.

One exception, for the client that owns a request: action ``cancel_pending`` (see
:meth:`Mailbox.cancel_pending`) remembers a cancel for a session that is not running *yet*
(its request still in preprocessing or queued for prefill), and ``register`` applies it.

Root: ``$MULTISTREAM_RUN_DIR/sessions`` when set, else a per-repository directory under
the system temp dir, so two servers on one host never share sessions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from backend.serving.hop_trace import cancel_hop

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: The one list of ``session_control`` actions. ``cancel_pending``: the cancel of the client that
#: owns an in-flight request and has not heard its first response (``Mailbox.cancel_pending``).
ACTIONS = ("input", "cancel", "cancel_pending", "status")
#: How long a pending cancel waits for its session to register (s). A request that was not in
#: decode this long after its client gave up never will be (the prefill queue is bounded).
PENDING_CANCEL_TTL_S = 60.0


class SessionNotFound(KeyError):
    """No live session with that id (never started, or ended)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "session not found"


class SessionLost(SessionNotFound):
    """The session's decode instance died: its request will never get another response.

    Why this exists: tritonserver 2.51 never completes the in-flight requests of a Python
    stub that died (no error, no final flag; the model even stays "ready"), so a client
    would wait until its own timeout. The mailbox knows the owner's pid, so any
    ``session_control`` call (``action: "status"`` when the stream stalls) can tell.
    """


def mailbox_root(model_repository: str | None = None) -> Path:
    """Where session directories live (shared by every model of one repository)."""
    run_dir = os.environ.get("MULTISTREAM_RUN_DIR")
    if run_dir:
        return Path(run_dir) / "sessions"
    repo = Path(model_repository).resolve().parent if model_repository else Path.cwd()
    digest = hashlib.sha1(str(repo).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"multistream-sessions-{digest}"


class Doorbell:
    """Wakes the decode loop of a session that just got a message (a cancel above all).

    Why: polled, a message waits for the loop's next check (up to an engine step), and the
    engine then needs up to one more step to stop the session; rung, decode hands a cancel to
    the engine at once, so the session ends at the next step boundary ("within one step").
    One Unix datagram socket per decode process, in Linux's abstract namespace (no file to
    clean up, gone with the process); its address is in each session's ``.owner`` file and
    :meth:`Mailbox.post` sends the session id to it once the message is in place. Best effort
    by design: a ring that cannot be sent (another OS, a full socket buffer) only falls back
    to the poll.
    """

    def __init__(self) -> None:
        self.address = f"@multistream-bell-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(sockaddr(self.address))
        self._waiters: dict[str, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mailbox-doorbell", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls) -> Doorbell | None:
        """A doorbell, or ``None`` where abstract Unix sockets do not exist (polling only)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            return cls()
        except OSError:
            return None

    def subscribe(self, session_id: str, wake: Callable[[], None]) -> None:
        """``wake()`` runs (on the doorbell's thread) for each message posted to the session."""
        with self._lock:
            self._waiters[session_id] = wake

    def unsubscribe(self, session_id: str) -> None:
        with self._lock:
            self._waiters.pop(session_id, None)

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(1024)
            except OSError:
                return  # closed
            if not data:
                return  # close() woke us
            with self._lock:
                wake = self._waiters.get(data.decode("utf-8", "replace"))
            if wake is not None:
                wake()

    def close(self) -> None:
        ring(self.address, "")  # an empty datagram ends the thread's recv
        self._thread.join(timeout=1.0)
        self._sock.close()


_RINGER = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if hasattr(socket, "AF_UNIX") else None


def sockaddr(address: str) -> str | bytes:
    """``@name`` (how ``.owner`` spells it, JSON-safe) -> the abstract address ``\\0name``."""
    return b"\0" + address[1:].encode() if address.startswith("@") else address


def ring(address: str, session_id: str) -> bool:
    """Sends the session id to a :class:`Doorbell`; False if it could not (the poll remains)."""
    if _RINGER is None:
        return False
    try:
        _RINGER.sendto(session_id.encode("utf-8"), socket.MSG_DONTWAIT, sockaddr(address))
        return True
    except OSError:
        return False


class Mailbox:
    """Session directories: register / post / poll / unregister, plus a reasoning-cancel flag."""

    def __init__(self, root: Path, pending_ttl_s: float = PENDING_CANCEL_TTL_S):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".cancel").mkdir(exist_ok=True)
        #: Cancels of sessions not registered yet, one empty file per id (its mtime: when).
        self.pending = self.root / ".pending"
        self.pending.mkdir(exist_ok=True)
        self.pending_ttl_s = pending_ttl_s

    @classmethod
    def for_args(cls, args: dict[str, Any]) -> Mailbox:
        return cls(mailbox_root(args.get("model_repository")))

    def _dir(self, session_id: str) -> Path:
        if not session_id or "/" in session_id or session_id.startswith("."):
            raise SessionNotFound(f"session_id {session_id!r} is not a valid session id")
        return self.root / session_id

    # -- owner side (decode) ---------------------------------------------------------------
    def register(self, session_id: str, doorbell: Doorbell | None = None) -> None:
        """Claims the id; ``ValueError`` if a live session already uses it.

        With ``doorbell`` (subscribed to the id first), each message posted rings it. A pending
        cancel of the id (``cancel_pending``, younger than the TTL) becomes the session's first
        message: decode reads it at its loop's first turn (the doorbell rang, and the first
        poll is due at once), so the session ends at the engine's next step boundary.
        """
        path = self._dir(session_id)
        try:
            path.mkdir()
        except FileExistsError:
            raise ValueError(f"session_id {session_id!r} is already in use by a running session") from None
        owner: dict[str, Any] = {"pid": os.getpid(), "t": time.time()}
        if doorbell is not None:
            owner["bell"] = doorbell.address
        (path / ".owner").write_text(json.dumps(owner))
        # After the directory exists: a ``cancel_pending`` racing with us either sees it (and
        # posts an ordinary cancel) or wrote its file before this look (and we take it).
        if self._take_pending(session_id):
            cancel_hop(session_id, "pending_applied")
            self.post(session_id, "cancel")

    def unregister(self, session_id: str) -> None:
        shutil.rmtree(self._dir(session_id), ignore_errors=True)

    def poll(self, session_id: str) -> list[tuple[str, str]]:
        """Messages ``(action, text)`` posted since the last poll, oldest first; each read once."""
        path = self._dir(session_id)
        try:
            names = sorted(e.name for e in os.scandir(path) if not e.name.startswith("."))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            f = path / name
            try:
                text = f.read_text(encoding="utf-8")
                f.unlink()
            except FileNotFoundError:
                continue
            out.append((name.rsplit(".", 1)[-1], text))
        return out

    # -- client side (session_control) -----------------------------------------------------
    def _owner(self, session_id: str) -> dict[str, Any]:
        """The session's ``.owner`` record (empty while it registers or once it ended)."""
        try:
            owner = json.loads((self._dir(session_id) / ".owner").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def owner_pid(self, session_id: str) -> int | None:
        """Pid of the decode process serving the session (None while it registers)."""
        try:
            return int(self._owner(session_id)["pid"])
        except (KeyError, TypeError, ValueError):
            return None

    def check(self, session_id: str) -> None:
        """``SessionNotFound`` unless live; ``SessionLost`` (and cleans up) if its owner died."""
        path = self._dir(session_id)
        if not path.is_dir():
            raise SessionNotFound(f"session_id {session_id!r} is not a running session (unknown or ended)")
        pid = self.owner_pid(session_id)
        if pid is not None and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            raise SessionLost(
                f"session_id {session_id!r} was lost: the decode instance serving it (pid {pid}) died; "
                "retry the request"
            )

    def post(self, session_id: str, action: str, text: str = "") -> None:
        """Drops a message for the owner; ``SessionNotFound`` if the session is not live.

        ``status`` only checks (``SessionLost`` when its decode instance died).
        """
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if action == "cancel_pending":
            self.cancel_pending(session_id)
            return
        path = self._dir(session_id)
        self.check(session_id)
        if action == "status":
            return
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.{action}"
        tmp = path / f".{name}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.rename(path / name)
        except FileNotFoundError:
            raise SessionNotFound(f"session_id {session_id!r} ended while the message was posted") from None
        if action == "cancel":
            cancel_hop(session_id, "mailbox_posted")
        bell = self._owner(session_id).get("bell")
        if isinstance(bell, str):
            ring(bell, session_id)

    def cancel_pending(self, session_id: str) -> bool:
        """Cancels the session, or, not running yet, when it registers; True if remembered.

        For the client that owns an in-flight request of this id and has not heard its first
        response: the request may still be in preprocessing or queued for prefill (seconds
        under load), so the session is not registered and a plain ``cancel`` would be "not
        found" and lost, while the ensemble (Triton 2.51) never tells decode of the stream's
        cancel: decode would register the session later and run it to ``max_tokens``.

        Rules, and why:

        - only this action remembers: a plain ``cancel`` (or ``input``) of an unknown id stays
          ``SessionNotFound`` (the front's 404), so a typo or someone else's stale id is told
          so, not silently accepted;
        - the clients send it only while they have heard nothing from the server (a response
          means decode registered the session; an error means it never will), with the id
          they chose themselves for that request (a fresh uuid unless the caller picked one);
        - consumed once, by the first ``register`` of the id, then gone;
        - kept for ``pending_ttl_s`` (60 s), pruned at each new pending cancel: a request that
          never reached decode (the ensemble dropped it after the stream cancel, or it failed
          earlier) leaves its cancel behind, and a later, unrelated request that reuses the id
          after the TTL must run normally. One that reuses it within the TTL is cancelled: a
          caller that retries a cancelled request under the same id should wait that long.

        ``SessionLost`` when the session runs but its decode instance died.
        """
        path = self._dir(session_id)
        if path.is_dir():
            self.post(session_id, "cancel")  # running: an ordinary cancel
            return False
        pending = self.pending / session_id
        tmp = self.pending / f".{session_id}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.touch()
        tmp.rename(pending)  # atomic, so ``register`` never takes half a record
        cancel_hop(session_id, "mailbox_pending")
        self._prune_pending()
        if path.is_dir():  # registered meanwhile: it may have looked before our file existed
            try:
                pending.unlink()
            except FileNotFoundError:
                return True  # ``register`` took it and posted the cancel
            try:
                self.post(session_id, "cancel")
            except SessionLost:
                raise
            except SessionNotFound:
                pass  # it ended already: nothing to cancel
            return False
        return True

    def _take_pending(self, session_id: str) -> bool:
        """Consumes the id's pending cancel; True if there was one younger than the TTL."""
        pending = self.pending / session_id
        try:
            age = time.time() - pending.stat().st_mtime
            pending.unlink()  # whoever unlinks it owns it: exactly one cancel goes out
        except FileNotFoundError:
            return False
        return age <= self.pending_ttl_s

    def _prune_pending(self) -> None:
        """Drops pending cancels (and stray temp files) older than the TTL: a bounded folder."""
        limit = time.time() - self.pending_ttl_s
        try:
            entries = list(os.scandir(self.pending))
        except FileNotFoundError:
            return
        for e in entries:
            try:
                if e.stat().st_mtime < limit:
                    os.unlink(e.path)
            except FileNotFoundError:
                continue

    # -- reasoning cancel flag (decode -> reasoning, which BLS cannot cancel in 2.51) --------
    def cancel_reasoning(self, session_id: str) -> None:
        (self.root / ".cancel" / session_id).touch()

    def reasoning_cancelled(self, session_id: str) -> bool:
        return (self.root / ".cancel" / session_id).exists()

    def clear_reasoning_cancel(self, session_id: str) -> None:
        (self.root / ".cancel" / session_id).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    """False for a gone process and for a zombie (a killed stub tritonserver never reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return True  # no /proc: trust kill(0)


def _first_text(request: Any, name: str, required: bool = True) -> str:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise ValueError(f"{name} is required")
        return ""
    arr = t.as_numpy().reshape(-1)
    if arr.size != 1:
        raise ValueError(
            f"{name}: batch size {arr.size} is not supported; send one control request at a time"
        )
    v = arr[0]
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class SessionControlModel:
    """Triton model ``session_control``: ``action`` "input" (with ``text_input``), "cancel",
    "cancel_pending" (the owner's cancel before its first response: ``Mailbox.cancel_pending``)
    or "status" (is the session still running: the client asks when its stream stalls)."""

    def initialize(self, args: dict[str, Any]) -> None:
        self.mailbox = Mailbox.for_args(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                session_id = _first_text(request, "session_id")
                action = _first_text(request, "action").strip().lower()
                if action not in ACTIONS:
                    raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
                text = _first_text(request, "text_input", required=action == "input")
                if action == "input" and not text:
                    raise ValueError("text_input must not be empty for action 'input'")
                self.mailbox.post(session_id, action, text)
                accepted = np.array([[True]], dtype=bool)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("accepted", accepted)]))
            except (ValueError, SessionNotFound) as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
