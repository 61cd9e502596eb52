"""Who sent a request: :class:`Identity`, what ``request.identity`` returns.

A plain value, built on access from the connection that read the request (so a request path that
never reads it pays nothing), and buildable by hand for a request no server serves (a test's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Identity"]


@dataclass(frozen=True)
class Identity:
    """Who sent a request, as the server knows it.

    ``peer``: the client's address, ``(host, port)`` for TCP (the real client's with
    ``proxy_protocol``), the server's socket path for a unix socket. ``tls_subject``: the subject of
    the client certificate the TLS handshake *verified* against ``ca_certs``, flattened to
    ``{"commonName": "client-1", ...}``; ``None`` without TLS or when the client sent no
    certificate (one that fails verification never gets this far: the handshake fails).
    ``tls_cert``: that certificate as ``ssl.SSLSocket.getpeercert()`` returns it (``subjectAltName``,
    ``notAfter``, ...), or ``None``. ``authenticated``: this connection passed AUTH with the server's
    ``auth_token``; always false on a server without a token (nobody authenticates there).
    """

    peer: Any
    tls_subject: dict[str, str] | None = None
    tls_cert: dict[str, Any] | None = None
    authenticated: bool = False
