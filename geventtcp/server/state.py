"""What a server's connections, built-ins and AUTH share: the :class:`ServerState` (uvicorn's ``ServerState``).

A :class:`~geventtcp.server.server.Server` owns listeners, acceptance and the watchdog; everything a
connection needs while it serves (settings, codec, clock, loop, counters, the command tables, the
in-flight counts, the set of open connections, the drain flag) lives here, in one object with
``__slots__``, which the server creates and hands to each :class:`~geventtcp.server.connection.Connection`
and to the built-in commands instead of itself. Reading ``state.x`` on the request path costs what
``server.x`` cost (one attribute load), and nothing here imports the server or the connection, so
the server-side modules form no import cycle (also under ``TYPE_CHECKING``).

The few operations that cross objects have names here: :meth:`ServerState.admit` (refuse or admit
a request, and arm the watch that hands it off if its handler blocks), :meth:`ServerState.watch_all`
(the watch pass), :meth:`ServerState.forget` (a connection closed), :meth:`ServerState.begin_drain`.
The counters are plain attributes the connections update themselves (``inflight``, ``stats``).

Failure behaviour: a connection's failure during the watch pass aborts that connection only; a
pass cut short puts the connections it did not reach back on the watch list.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from gevent.event import Event

from geventtcp.codec import Codec
from geventtcp.config import Settings
from geventtcp.errors import Code
from geventtcp.protocol import Request
from geventtcp.server.readers import ReaderPool
from geventtcp.server.request import ServerRequest
from geventtcp.server.stats import Stats
from geventtcp.urls import Registry

__all__ = ["Handler", "ServerState", "Watched"]

log = logging.getLogger("geventtcp.server")

#: Handoffs one watch pass makes before it checks whether the hub should poll (gevent's own
#: callback runner checks after every 50 callbacks whether the switch interval has passed).
_WATCH_SLICE = 50

#: A command's handler as the command tables hold it.
Handler = Callable[[ServerRequest], Any]


class Watched(Protocol):
    """What the state needs of a connection (:class:`~geventtcp.server.connection.Connection` is one)."""

    address: Any
    inflight: int
    running: Any
    reader: Any
    watch_armed: bool
    #: Greenlets (and their requests) still running handlers when the connection was aborted.
    orphans: dict[Any, Any] | None

    def hand_off(self) -> None: ...

    def abort(self, cancel: bool = True) -> None: ...


C = TypeVar("C", bound=Watched)


class ServerState(Generic[C]):
    """One server's shared state; the server creates it, its connections and built-ins read and update it.

    Owned here: the command tables (set by ``Server.start``), the in-flight counts (updated by the
    connections as requests are handed off and answered), the set of open connections with their
    per-peer counts, the watch list, and the drain flag and reason. ``watch_armed`` lives on each
    connection (a slot load on the request path) but belongs to the watch: :meth:`admit` sets it,
    the watch pass clears it.
    """

    __slots__ = (
        "settings", "codec", "token", "registry", "stats", "loop", "clock", "readers", "plain_sockets",
        "calls", "preauth_calls", "cancel_on_disconnect", "limited", "new_context", "access_log",
        "connections", "orphaned", "peers", "proxy_pending", "all_closed", "inflight", "blocking", "watching",
        "tick", "draining", "drain_reason", "started_at",
    )

    def __init__(self, settings: Settings, codec: Codec, token: str | None, registry: Registry, loop: Any,
                 plain_sockets: bool) -> None:
        #: Typed and frozen: the request path reads its limits here directly (a slot load each).
        self.settings = settings
        self.codec = codec
        self.token = token  # the AUTH secret, ``None`` when auth is off
        self.registry = registry
        self.stats = Stats()
        self.loop = loop
        self.clock: Callable[[], float] = time.monotonic
        self.readers = ReaderPool()  # greenlets shared by parked (idle) connections
        self.plain_sockets = plain_sockets  # no TLS: connections may use the raw socket's send/recv
        self.calls: dict[int, Handler] = {}
        self.preauth_calls: dict[int, Handler] = {}
        #: cmdids registered with ``cancel_on_disconnect``: RequestCancelled is thrown into them.
        self.cancel_on_disconnect: frozenset[int] = frozenset()
        #: cmdids registered with ``max_concurrency``: only their limiter's ServerRefusal is a 503.
        self.limited: frozenset[int] = frozenset()
        #: A fresh copy of the worker's base context (the one ``Server.start`` ran in) per request: a
        #: contextvar one request sets (a "current user") is never seen by the next.
        self.new_context: Callable[[], contextvars.Context] = contextvars.Context
        self.access_log: Callable[[C, Request, int, float], None] | None = None
        self.connections: set[C] = set()
        #: Aborted connections whose handlers were still running (:meth:`orphaned_by`): closed and
        #: forgotten, but ``Server.close`` must still kill those handlers.
        self.orphaned: set[C] = set()
        self.peers: dict[str, int] = {}  # open connections per peer IP
        #: Accepted connections still reading their PROXY header: not yet in ``connections``, but
        #: ``Server.stop()`` waits for them too, so each gets its goaway before the process exits.
        self.proxy_pending = 0
        self.all_closed = Event()  # set while no connection is open nor pending
        self.all_closed.set()
        self.inflight = 0  # requests handed off to their own greenlet, over all connections
        #: Application cmdids whose handler has blocked (been handed off) in this process: only
        #: these are refused at a full in-flight limit (see :meth:`admit`).
        self.blocking: set[int] = set()
        #: Connections that started a handler since the hub last ran :meth:`watch_all`: one hub
        #: callback checks them all, instead of one callback per request.
        self.watching: list[C] = []
        self.tick = 0  # the watchdog's tick count
        self.draining = False
        self.drain_reason = "shutdown"
        self.started_at = 0.0

    def begin_drain(self, reason: str) -> None:
        """From now on readers send a goaway (``reason``) instead of reading the next request."""
        self.draining = True
        self.drain_reason = reason

    # -- per request ------------------------------------------------------------------------------

    def admit(self, conn: C, req: Request) -> tuple[int, str] | None:
        """Why ``req`` must not run now (code, message), or ``None`` after arming ``conn``'s watch.

        The in-flight limits count handed-off (blocked) requests. A full limit refuses only a
        command that has blocked before in this process (:attr:`blocking`): built-ins and commands
        that answer inline always run, so PING and STATS work on a full worker. A command not yet
        seen blocking is admitted and, if it blocks, counted past the limit (once: from then on it
        is known), so the limit can be exceeded by one request per connection per new command.

        An admitted request runs inline next: the watch is armed here (at most one hub callback per
        hub turn for all connections, :meth:`watch_all`), so that if its handler yields, the hub
        hands the connection's reading to another greenlet. One call per request does both.
        """
        if req.deadline is not None and req.deadline <= self.clock():
            return Code.DEADLINE_EXCEEDED, "deadline passed before the request started"
        settings = self.settings
        if (conn.inflight >= settings.max_inflight_per_connection or self.inflight >= settings.max_inflight) \
                and req.cmdid in self.blocking:
            return self._refuse_inflight(conn)
        if not conn.watch_armed:
            conn.watch_armed = True
            watching = self.watching
            if not watching:
                self.loop.run_callback(self.watch_all)
            watching.append(conn)
        return None

    def _refuse_inflight(self, conn: C) -> tuple[int, str]:
        if conn.inflight >= self.settings.max_inflight_per_connection:
            return Code.UNAVAILABLE, "too many requests in flight on this connection"
        return Code.UNAVAILABLE, "too many requests in flight on this server"

    def watch_all(self) -> None:
        """Hub callback: let each connection in :attr:`watching` hand off a handler that yielded.

        Each handoff goes on with its connection's batch before returning here, so after
        ``_WATCH_SLICE`` of them past the switch interval the rest wait for the next hub turn (as
        gevent's own callback runner lets the loop poll). Connections not reached, the pass cut
        short or an exception escaping it, are put back: none keeps a watch armed unwatched.
        """
        conns = self.watching
        self.watching = []
        started = self.clock()
        done = 0
        try:
            for conn in conns:
                done += 1
                if conn.running is None:  # the handler returned before the hub ran: no handoff
                    conn.watch_armed = False
                    continue
                try:
                    conn.hand_off()
                except Exception:  # one connection's failure must not leave the others unwatched
                    log.exception("connection %s: handoff failed", conn.address)
                    conn.abort()
                if done % _WATCH_SLICE == 0 and self.clock() - started > sys.getswitchinterval():
                    break
        finally:
            if done < len(conns):
                if not self.watching:
                    self.loop.run_callback(self.watch_all)
                self.watching[:0] = conns[done:]

    def deadline_for(self, req: Request) -> float | None:
        """The monotonic time at which ``req``'s handler is stopped: its own deadline or the default."""
        deadline = req.deadline
        default = self.settings.handler_timeout
        if default:
            limit = self.clock() + default
            if deadline is None or limit < deadline:
                deadline = limit
        return deadline

    # -- open connections -------------------------------------------------------------------------

    def orphaned_by(self, conn: C) -> None:
        """``conn`` was aborted with handlers still running (its ``orphans``, or an inline one): keep
        it for ``Server.close``, which kills them; connections whose handlers ended are dropped here."""
        orphaned = self.orphaned
        for old in [c for c in orphaned if not c.orphans and c.running is None]:
            orphaned.discard(old)
        orphaned.add(conn)

    def forget(self, conn: C) -> None:
        """Called by a connection once its socket is closed."""
        if conn in self.connections:
            self.connections.discard(conn)
            if isinstance(conn.address, tuple):
                self.release_peer(conn.address[0])
        if not self.connections and not self.proxy_pending:
            self.all_closed.set()

    def release_peer(self, peer: str | None) -> None:
        """One connection from ``peer`` fewer (``None``: not an IP peer, nothing counted)."""
        if peer is None:
            return
        left = self.peers.get(peer, 1) - 1
        if left > 0:
            self.peers[peer] = left
        else:
            self.peers.pop(peer, None)
