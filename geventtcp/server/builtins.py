"""Built-in commands, on negative cmdids so they never collide with an application's (which are >= 0).

The cmdids themselves are a wire fact, :class:`geventtcp.protocol.Builtin`; ``Builtin`` stays
importable from here for compatibility.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from geventtcp.errors import HandlerError, ProtocolError
from geventtcp.protocol import PROTOCOL_VERSION, UNORDERED, Builtin, Request, negotiate
from geventtcp.server.security import make_auth

if TYPE_CHECKING:
    from geventtcp.server.state import Handler, ServerState
    from geventtcp.urls import HandlerInfo

__all__ = ["Builtin", "make_builtins"]


def make_builtins(state: ServerState[Any]) -> dict[int, Handler]:
    """The built-in commands, reading the server's shared ``state``."""

    def ping(request: Request) -> Any:
        """Health check: answers while the server runs; ``draining`` is true during shutdown."""
        return {"pong": True, "draining": state.draining, "pid": os.getpid(), "protocol": PROTOCOL_VERSION}

    def list_commands(request: Request) -> Any:
        """The registered cmdids with their handlers' names, docstrings, concurrency limits (only for
        commands that have one) and the JSON Schema of their params (``"params"``, only for a command
        registered with ``params=``)."""
        return [_listing(info) for info in state.registry]

    def stats(request: Request) -> Any:
        """Counters per cmdid and for this worker."""
        data = state.stats.as_dict()
        data.update({
            "pid": os.getpid(),
            "uptime_s": round(time.time() - state.started_at, 3),
            "connections": len(state.connections),
            "inflight": state.inflight,
        })
        return data

    def hello(request: Request) -> Any:
        """Protocol negotiation (1.1): switch on the requested features this server knows, for the
        requests read after this one on the connection; reply with the version, the features in
        force, this process's ``pid`` and the number of ``workers`` sharing its listener (so that a
        client can spread its connections over them)."""
        conn = request.connection  # type: ignore[attr-defined]  # a ServerRequest, served by a Connection
        try:
            data, features = negotiate(request.params, frozenset((UNORDERED,)) if conn.unordered else frozenset())
        except ProtocolError as exc:
            raise HandlerError(exc.msg) from None
        conn.unordered = UNORDERED in features
        data["pid"] = os.getpid()
        data["workers"] = state.settings.workers
        return data

    return {Builtin.PING: ping, Builtin.LIST: list_commands, Builtin.STATS: stats,
            Builtin.AUTH: make_auth(state, state.token), Builtin.HELLO: hello}


def _listing(info: HandlerInfo) -> dict[str, Any]:
    item = {"cmdid": info.cmdid, "name": info.name, "doc": info.doc, "idempotent": info.idempotent}
    if info.max_concurrency is not None:  # only commands that have a limit: older listings unchanged
        item["max_concurrency"] = info.max_concurrency
    if info.params is not None:
        item["params"] = info.params.json_schema
    return item
