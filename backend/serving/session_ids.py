"""Session ids that name the replica holding the session (docs/kubernetes.md, "How sessions stay on their replica").

Why: a session lives in one server (its KV slot and its mailbox), so with several replicas
behind a proxy every later request of that session (``session_control`` input / cancel)
must reach the same replica. A server-minted id carries the replica's name, so a proxy can
route on the id alone, without shared state: ``<replica>.<32 hex digits>``, e.g.
``multistream-1.5f0c...``. The proxy reads it from the ``x-multistream-session`` header
(gRPC metadata or HTTP header) and sends the request to that replica; an id the client chose
is hashed instead.

The replica's name comes from ``$MULTISTREAM_REPLICA`` (in Kubernetes, the pod name of the
StatefulSet, which is also its DNS name under the headless Service). Without it the id is
the bare 32 hex digits, as on a single server.
"""

from __future__ import annotations

import os
import re
import uuid

#: Environment variable naming this server's replica (the launcher's caller or the pod spec sets it).
REPLICA_ENV = "MULTISTREAM_REPLICA"
#: A DNS label (RFC 1123): what a replica name must be, because the proxy resolves it as one.
_REPLICA_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: A server-minted id with a replica prefix; the proxy's nginx map uses the same pattern.
MINTED_RE = re.compile(r"(?P<replica>[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)\.[0-9a-f]{32}")


def replica_name(environ: dict[str, str] | None = None) -> str:
    """This server's replica name, or ``""`` when none is configured.

    A name that is no DNS label fails every request that needs an id (the error names the
    variable) rather than being minted into ids that no router can route.
    """
    name = (os.environ if environ is None else environ).get(REPLICA_ENV, "").strip().lower()
    if name and not _REPLICA_RE.fullmatch(name):
        raise ValueError(
            f"{REPLICA_ENV} must be a DNS label (1..63 of a-z, 0-9, '-', not starting or ending with '-'), "
            f"got {name!r}"
        )
    return name


def mint_session_id(environ: dict[str, str] | None = None) -> str:
    """A fresh session id: ``<replica>.<hex>`` when this server has a replica name, else ``<hex>``."""
    replica = replica_name(environ)
    token = uuid.uuid4().hex
    return f"{replica}.{token}" if replica else token


def replica_of(session_id: str) -> str | None:
    """The replica a server-minted id names, or ``None`` (a client-chosen or unprefixed id)."""
    match = MINTED_RE.fullmatch(session_id)
    return match.group("replica") if match else None
