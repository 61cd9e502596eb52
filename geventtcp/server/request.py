"""The request as a server runs it: the sans-IO :class:`~geventtcp.protocol.Request` plus what the
server needs to schedule it, so the protocol's class carries no server field.

:class:`ServerRequest` adds three slots and no ``__init__``: ``parse_request(..., ServerRequest)``
builds it directly (one object per request, as before); the connection sets the three fields right
after admitting it. Handlers see a ``Request`` and use only its public fields, ``cancelled`` and
``identity`` (who called: computed from the connection when read, so it costs nothing otherwise).
"""

from __future__ import annotations

from typing import Any

from geventtcp.identity import Identity
from geventtcp.protocol import Request

__all__ = ["ServerRequest"]


class ServerRequest(Request):
    """A :class:`Request` being served: ``connection`` is the server connection that read it (the
    AUTH built-in switches it), ``_slot`` its reserved place in the output queue once handed off,
    ``_timer`` the deadline (or cancel marker) timer while a handed-off handler runs. All three are
    owned by :class:`~geventtcp.server.connection.Connection` and set before the handler runs."""

    __slots__ = ("connection", "_slot", "_timer")

    connection: Any
    _slot: Any
    _timer: Any

    @property
    def cancelled(self) -> bool:
        """True once nobody can receive the reply: the connection was reset, failed or was closed.

        A peer that only half-closed (sent EOF) still gets its replies, so this stays false for it.
        Computed from the connection on access, so it costs the request path nothing.
        """
        return bool(self.connection.closed)

    @property
    def identity(self) -> Identity:
        """Who called (see :class:`~geventtcp.identity.Identity`), computed from the connection on each
        access: the peer address, the verified TLS client certificate, whether AUTH passed."""
        conn = self.connection
        state = conn.state
        cert = conn.peer_cert  # read once after the handshake: the socket may be shut down or closed by now
        subject = {name: value for rdn in cert.get("subject", ()) for name, value in rdn} if cert else None
        return Identity(
            peer=conn.address,
            tls_subject=subject,
            tls_cert=cert or None,
            authenticated=state.token is not None and conn.calls is state.calls,
        )
