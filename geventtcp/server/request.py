"""The request as a server runs it: the sans-IO :class:`~geventtcp.protocol.Request` plus what the
server needs to schedule it, so the protocol's class carries no server field.

:class:`ServerRequest` adds three slots and no ``__init__``: ``parse_request(..., ServerRequest)``
builds it directly (one object per request, as before); the connection sets the three fields right
after admitting it. Handlers see a ``Request`` and use only its public fields and ``cancelled``.
"""

from __future__ import annotations

from typing import Any

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
