"""The server: listeners, connection limits, the timeout watchdog and graceful drain."""

from __future__ import annotations

import contextvars
import errno
import logging
import math
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent import GreenletExit, Timeout
from gevent.event import Event
from gevent.hub import get_hub
from gevent.server import StreamServer

from geventtcp.codec import get_codec
from geventtcp.config import Config, Settings
from geventtcp.errors import Code
from geventtcp.protocol import PREAUTH_CMDIDS, Request, encode_error, encode_goaway
from geventtcp.server.builtins import make_builtins
from geventtcp.server.connection import Connection
from geventtcp.server.proxyproto import (
    MAX_HEADER_BYTES,
    ProxyHeader,
    ProxyHeaderError,
    is_trusted,
    parse,
    trusted_networks,
)
from geventtcp.server.readers import ReaderPool
from geventtcp.server.security import check_listen_addresses, is_loopback, is_protected, load_token
from geventtcp.server.stats import Stats
from geventtcp.sockets import create_listener, format_address, send_and_linger, unsent_bytes
from geventtcp.tls import handshake, server_context_from_settings
from geventtcp.urls import Registry, default_registry

__all__ = ["Server"]

log = logging.getLogger("geventtcp.server")

#: Handoffs one watch pass makes before it checks whether the hub should poll (gevent's own
#: callback runner checks after every 50 callbacks whether the switch interval has passed).
_WATCH_SLICE = 50


class _AcceptBackoff(GreenletExit):  # type: ignore[misc]
    """Raised from ``do_read`` when descriptors run out: gevent's accept loop backs off (10 ms, doubling
    to 1 s) as for any accept error, and its hub prints no traceback for a GreenletExit."""


#: accept() errors that mean "out of resources": retried with back-off, logged at most every 10 s.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _recv_proxy_header(sock: Any) -> ProxyHeader:
    """Read exactly the PROXY header from ``sock``: whatever follows stays in the kernel's buffer.

    Bytes are peeked first and only header bytes are taken, so the client's first request line, or
    its TLS ClientHello, is read afterwards by the connection (or the handshake) as usual. A header
    split over several segments is taken piece by piece (every byte of an unfinished header is
    header), so a peek never spins on bytes already seen.
    """
    taken = b""
    while True:
        peeked = sock.recv(MAX_HEADER_BYTES - len(taken), socket.MSG_PEEK)
        if not peeked:
            raise ProxyHeaderError("connection closed before the PROXY header was complete")
        header = parse(taken + peeked)
        want = len(peeked) if header is None else header.length - len(taken)
        while want > 0:  # peeked bytes are queued: recv returns them at once
            chunk = sock.recv(want)
            if not chunk:
                raise ProxyHeaderError("connection closed inside the PROXY header")
            taken += chunk
            want -= len(chunk)
        if header is not None:
            return header


def _kill_all(glets: list[Any]) -> None:
    """Hub callback: raise GreenletExit in each greenlet still alive (handlers cut off by close)."""
    for glet in glets:
        if not glet.dead:
            try:
                glet.throw(GreenletExit)
            except BaseException:  # an exception the handler raised instead: log it, kill the rest
                log.exception("killing a handler greenlet failed")


class _Acceptor(StreamServer):  # type: ignore[misc]
    """A StreamServer that leaves closing the accepted socket to our Connection."""

    _warned_at = -math.inf

    def do_close(self, *args: Any) -> None:
        pass

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            now = time.monotonic()
            if now - self._warned_at >= 10.0:
                self._warned_at = now
                log.warning("accept failed: %s; retrying with back-off (open connections are not affected)",
                            exc.strerror)
            raise _AcceptBackoff() from None


class Server:
    """Serve a :class:`Registry` on one or more listeners in this process, one greenlet per connection.

    ``Server(registry, bind="127.0.0.1:0")`` binds when started; ``listeners=[sock, ...]`` serves
    sockets that are already listening (the launcher binds once in the master and hands them to
    workers). Any setting of :mod:`geventtcp.config` may be given as a keyword or in ``config``.

    Use ``start()``/``stop()``, ``serve_forever()``, or ``with Server(...) as server:``; after start,
    ``address`` is the first bound address as ``(host, port)`` (useful with port 0).

    Failure behaviour: a handler's exception is answered with code 500 and logged; protocol errors
    get their error reply; a connection's I/O error closes only that connection. ``stop`` is
    graceful: listeners close at once, every request already read is answered, idle connections
    get a goaway line, and whatever is still running after ``graceful_timeout`` is killed.
    """

    def __init__(
        self,
        registry: Registry | None = None,
        bind: str | Iterable[str] | None = None,
        *,
        config: Config | None = None,
        listeners: Iterable[Any] | None = None,
        ssl_context: Any = None,
        **settings: Any,
    ) -> None:
        resolved = Config(dict(config.values), dict(config.sources)) if config is not None else Config()
        if bind is not None:
            settings["bind"] = [bind] if isinstance(bind, str) else list(bind)
        resolved.update(settings, "argument")
        #: Typed and frozen: the request path reads its limits here directly (a slot load each).
        self.settings: Settings = resolved.freeze()
        self.registry = registry if registry is not None else default_registry
        self.codec = get_codec(self.settings.codec)
        self.token = load_token(self.settings)
        self.protected = is_protected(self.settings, self.token)
        #: Peers trusted to send a PROXY header (``None``: any); unused unless proxy_protocol is on.
        self.proxy_from = trusted_networks(self.settings.proxy_allow_from)
        self.ssl_context = ssl_context if ssl_context is not None else server_context_from_settings(self.settings)
        self.plain_sockets = self.ssl_context is None
        self.stats = Stats()
        self.calls: dict[int, Callable[[Request], Any]] = {}
        self.preauth_calls: dict[int, Callable[[Request], Any]] = {}
        #: cmdids registered with ``cancel_on_disconnect``: RequestCancelled is thrown into them.
        self.cancel_on_disconnect: frozenset[int] = frozenset()
        self.peers: dict[str, int] = {}  # open connections per peer IP
        self.connections: set[Connection] = set()
        self.readers = ReaderPool()  # greenlets shared by parked (idle) connections
        #: Connections that started a handler since the hub last ran :meth:`_watch_all`: one hub
        #: callback checks them all, instead of one callback per request.
        self.watching: list[Connection] = []
        self.inflight = 0
        #: Application cmdids whose handler has blocked (been handed off) in this process: only
        #: these are refused at a full in-flight limit (see :meth:`admit`).
        self.blocking: set[int] = set()
        #: Accepted connections still reading their PROXY header: not yet in ``connections``, but
        #: ``stop()`` waits for them too, so each gets its goaway before the process exits.
        self.proxy_pending = 0
        self.tick = 0
        self.draining = False
        self.drain_reason = "shutdown"
        self.access_log: Callable[[Connection, Request, int, float], None] | None = None
        self.clock = time.monotonic
        #: A fresh copy of the worker's base context (the one :meth:`start` ran in) per request: a
        #: contextvar one request sets (a "current user") is never seen by the next.
        self.new_context: Callable[[], contextvars.Context] = contextvars.Context
        #: Connections one listener accepts per wakeup; the launcher sets 1 when several worker
        #: processes share a listener, so one worker does not take a whole burst (as gunicorn does).
        self.max_accept: int = StreamServer.max_accept
        self.started_at = 0.0
        self.loop = get_hub().loop
        self._given_listeners = list(listeners) if listeners is not None else None
        self._own_listeners: list[Any] = []
        self._acceptors: list[_Acceptor] = []
        self._bound: list[tuple[Any, str]] = []
        self._watchdog: gevent.Greenlet | None = None
        self._all_closed = Event()
        self._all_closed.set()
        self._stopped = Event()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return bool(self._acceptors)

    def start(self) -> None:
        """Bind (unless given listeners) and start accepting; returns at once."""
        if self.started:
            return
        self._stopped.clear()
        self.draining = False
        self.new_context = contextvars.copy_context().copy
        self.calls = dict(self.registry.calls)
        self.cancel_on_disconnect = frozenset(info.cmdid for info in self.registry if info.cancel_on_disconnect)
        self.calls.update(make_builtins(self))
        self.preauth_calls = {cmdid: self.calls[cmdid] for cmdid in PREAUTH_CMDIDS}
        self._raise_fd_limit()
        listeners = self._given_listeners
        if listeners is None:
            listeners = self._own_listeners = [create_listener(b, self.settings.backlog) for b in self.settings.bind]
        try:
            if self.protected:
                check_listen_addresses(sock.getsockname() for sock in listeners)
            for sock in listeners:
                # TLS is wrapped in _handle, under a handshake timeout, not by the StreamServer.
                acceptor = _Acceptor(sock, self._handle)
                acceptor.max_accept = self.max_accept
                acceptor.start()
                self._acceptors.append(acceptor)
        except BaseException:
            self.close()
            raise
        self.started_at = time.time()
        self._bound = [(a.socket.getsockname(), format_address(a.socket)) for a in self._acceptors]
        self._watchdog = gevent.spawn(self._watch_timeouts)
        log.info("listening on %s (pid %d)", ", ".join(self.addresses), __import__("os").getpid())

    def serve_forever(self) -> None:
        """Start, then block until :meth:`stop` or :meth:`close` is called."""
        self.start()
        self._stopped.wait()

    def stop(self, timeout: float | None = None, reason: str = "shutdown") -> None:
        """Drain gracefully, waiting at most ``timeout`` (default ``graceful_timeout``) seconds.

        Listeners stop accepting first (a shared listening socket stays open in other processes).
        Connections finish every request they have read, send a goaway line and close; after the
        timeout the rest are closed and their handlers killed.
        """
        if timeout is None:
            timeout = self.settings.graceful_timeout
        self.draining = True
        self.drain_reason = reason
        for acceptor in self._acceptors:
            acceptor.close()
        for conn in list(self.connections):
            self.loop.run_callback(conn.interrupt, reason)
        if not self._all_closed.wait(timeout):
            log.warning("graceful timeout: closing %d connection(s) with requests still running",
                        len(self.connections))
        self.close()

    def stop_accepting(self) -> None:
        """Accept no new connection from now on; the listeners stay open (and queue) until stop or close."""
        for acceptor in self._acceptors:
            acceptor.stop_accepting()

    def close(self) -> None:
        """Stop at once: close listeners and connections, kill running handlers."""
        self.draining = True
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        for sock in self._own_listeners:
            sock.close()
        self._own_listeners = []
        doomed: list[Any] = []
        for conn in list(self.connections):
            doomed.extend(conn.handlers)
            if conn.running is not None and conn.reader is not None:
                doomed.append(conn.reader)  # an inline handler that yielded before its handoff ran
            conn.abort(cancel=False)  # the handlers are killed below instead
        if doomed:  # raw reader greenlets: gevent.killall(block=False) wants gevent Greenlets
            self.loop.run_callback(_kill_all, doomed)
        if self._watchdog is not None:
            self._watchdog.kill(block=False)
            self._watchdog = None
        self._stopped.set()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def addresses(self) -> list[str]:
        """Every bound address as a bind string (still known after stop)."""
        return [text for _, text in self._bound]

    @property
    def address(self) -> Any:
        """The first listener's bound address: ``(host, port)``, or the path of a unix socket."""
        if not self._bound:
            raise RuntimeError("the server is not started")
        return self._bound[0][0]

    # -- per connection and request --------------------------------------------------------------

    def _handle(self, sock: Any, address: Any) -> None:
        if self.settings.proxy_protocol:
            address = self._proxy_address(sock, address)
            if address is None:
                return
        if self.draining:
            self._refuse(sock, encode_goaway(self.codec, self.drain_reason), linger=True)
            return
        if len(self.connections) >= self.settings.max_connections:
            self.stats.connections_rejected += 1
            self._refuse(sock, encode_error(self.codec, Code.UNAVAILABLE, "max number of connections reached"))
            return
        peer = address[0] if isinstance(address, tuple) else None
        if peer is not None:
            if self.protected and not is_loopback(address):
                self.stats.connections_rejected += 1
                log.warning("protected mode: denied non-loopback peer %r", peer)
                self._refuse(sock, encode_error(
                    self.codec, Code.PERMISSION_DENIED, "protected mode: no authentication is configured, so only "
                    "loopback clients are accepted (see auth_token, --no-protected-mode)"))
                return
            per_peer = self.settings.max_connections_per_peer
            if per_peer and self.peers.get(peer, 0) >= per_peer:
                self.stats.connections_rejected += 1
                self._refuse(sock, encode_error(self.codec, Code.UNAVAILABLE, "too many connections from peer"))
                return
        if peer is not None:  # counted from here, so silent TLS handshakes count against the peer too
            self.peers[peer] = self.peers.get(peer, 0) + 1
        if self.ssl_context is not None:
            try:
                sock = handshake(self.ssl_context, sock, self.settings.tls_handshake_timeout)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                self.stats.tls_failures += 1
                log.info("TLS handshake with %r failed: %r", address, exc)
                self._release_peer(peer)
                return
        conn = Connection(self, sock, address or sock.getsockname())
        self.connections.add(conn)
        self._all_closed.clear()
        self.stats.connections_total += 1
        try:
            conn.serve()
        except BaseException:
            conn.abort()
            raise

    def _proxy_address(self, sock: Any, address: Any) -> Any:
        """The client address the PROXY header gives, or the socket's own for a LOCAL header (the
        proxy's health check); ``None`` after closing the connection: from an untrusted peer, with a
        missing, malformed or late header (such a peer is never served as a plain client), or with
        a drain begun while the header arrived (answered with a goaway, as any connection is).

        The wait counts in :attr:`proxy_pending`, so ``stop()`` does not return (and a worker does
        not exit) under a connection it accepted before draining: that peer would see a bare close.
        """
        self.proxy_pending += 1
        self._all_closed.clear()
        try:
            address = self._read_proxy_header(sock, address)
            if address is not None and self.draining:
                self._refuse(sock, encode_goaway(self.codec, self.drain_reason), linger=True)
                return None
            return address
        finally:
            self.proxy_pending -= 1
            if not self.proxy_pending and not self.connections:
                self._all_closed.set()

    def _read_proxy_header(self, sock: Any, address: Any) -> Any:
        """See :meth:`_proxy_address`: the header's client address, or ``None`` once closed."""
        if not is_trusted(address, self.proxy_from):
            why: Any = "peer not in proxy_allow_from"
        elif len(self.connections) + self.proxy_pending > self.settings.max_connections:
            # Counted before the wait (proxy_pending includes this one): a silent header must not
            # hold a descriptor past the limit for proxy_protocol_timeout.
            self.stats.connections_rejected += 1
            self._refuse(sock, encode_error(self.codec, Code.UNAVAILABLE, "max number of connections reached"))
            return None
        else:
            timeout = self.settings.proxy_protocol_timeout
            try:
                with Timeout(timeout or None, TimeoutError(f"no PROXY header within {timeout:g}s")):
                    header = _recv_proxy_header(sock)
                return header.source or address
            except (OSError, TimeoutError, ProxyHeaderError) as exc:
                why = exc
        self.stats.proxy_header_failures += 1
        log.warning("PROXY protocol: closed connection from %r: %s", address, why)
        sock.close()
        return None

    def _refuse(self, sock: Any, line: bytes, linger: bool = False) -> None:
        """Best-effort final line, then close: a refused peer never waits in the backlog.

        On a TLS listener nothing is written (the peer expects a handshake, not a JSON line).
        ``linger`` (a goaway while draining) half-closes and reads for up to LINGER_SECONDS first:
        a peer that already wrote a request would otherwise get a reset that can destroy the line
        telling it the request was not processed.
        """
        if self.ssl_context is not None:
            sock.close()
        elif linger:
            send_and_linger(sock, line)
        else:
            try:
                sock.sendall(line)
            except OSError:
                pass
            finally:
                sock.close()

    def forget(self, conn: Connection) -> None:
        """Called by a connection once its socket is closed."""
        if conn in self.connections:
            self.connections.discard(conn)
            if isinstance(conn.address, tuple):
                self._release_peer(conn.address[0])
        if not self.connections and not self.proxy_pending:
            self._all_closed.set()

    def _release_peer(self, peer: str | None) -> None:
        if peer is None:
            return
        left = self.peers.get(peer, 1) - 1
        if left > 0:
            self.peers[peer] = left
        else:
            self.peers.pop(peer, None)

    def admit(self, conn: Connection, req: Request) -> tuple[int, str] | None:
        """Why ``req`` must not run now (code, message), or ``None``; a refused handler never runs.

        The in-flight limits count handed-off (blocked) requests. A full limit refuses only a
        command that has blocked before in this process (:attr:`blocking`): built-ins and commands
        that answer inline always run, so PING and STATS work on a full worker. A command not yet
        seen blocking is admitted and, if it blocks, counted past the limit (once: from then on it
        is known), so the limit can be exceeded by one request per connection per new command.
        """
        if req.deadline is not None and req.deadline <= self.clock():
            return Code.DEADLINE_EXCEEDED, "deadline passed before the request started"
        settings = self.settings
        if (conn.inflight >= settings.max_inflight_per_connection or self.inflight >= settings.max_inflight) \
                and req.cmdid in self.blocking:
            return self._refuse_inflight(conn)
        return None

    def _refuse_inflight(self, conn: Connection) -> tuple[int, str]:
        if conn.inflight >= self.settings.max_inflight_per_connection:
            return Code.UNAVAILABLE, "too many requests in flight on this connection"
        return Code.UNAVAILABLE, "too many requests in flight on this server"

    def _watch_all(self) -> None:
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
                    conn._watch()
                except Exception:  # one connection's failure must not leave the others unwatched
                    log.exception("connection %s: handoff failed", conn.address)
                    conn.abort()
                if done % _WATCH_SLICE == 0 and self.clock() - started > sys.getswitchinterval():
                    break
        finally:
            if done < len(conns):
                if not self.watching:
                    self.loop.run_callback(self._watch_all)
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

    # -- timeouts --------------------------------------------------------------------------------

    def _tick_seconds(self) -> float:
        s = self.settings
        spans = [t for t in (s.idle_timeout, s.request_timeout, s.write_timeout, s.max_connection_age,
                             s.auth_timeout if self.token is not None else 0) if t]
        return min(1.0, max(0.02, min(spans) / 4)) if spans else 1.0

    def _watch_timeouts(self) -> None:
        """Every tick, interrupt connections that sat idle, half-sent a line, or stopped reading.

        One periodic sweep instead of a timer per ``recv`` keeps timeouts off the request path.
        """
        period = self._tick_seconds()
        s = self.settings

        def ticks(seconds: float) -> int:
            return math.ceil(seconds / period) if seconds else 0

        idle, slow, write = ticks(s.idle_timeout), ticks(s.request_timeout), ticks(s.write_timeout)
        auth = ticks(s.auth_timeout) if self.token is not None else 0
        # A connection older than max_connection_age (plus its own jitter, derived from its id so
        # the sweep stays stateless) gets a goaway once idle, so long-lived clients move on.
        age, age_jitter = ticks(s.max_connection_age), ticks(s.max_connection_age * s.max_connection_age_jitter)
        run = self.loop.run_callback
        while True:
            gevent.sleep(period)
            self.tick += 1
            now = self.tick
            for conn in list(self.connections):
                if auth and now - conn.created_tick >= auth and conn.calls is not self.calls:
                    # Absolute from connect, whatever the connection is doing: a peer that pipelines
                    # PINGs and reads the replies slowly keeps a writer making progress forever.
                    run(conn.interrupt, "auth")  # a 401 line and close; a waiting send is cut
                elif conn.writer is not None and write and now - conn.write_tick >= write:
                    # The kernel's send queue shrinking is progress (a slow but steady reader);
                    # gevent only wakes a writer once a third of the buffer is free, too coarse.
                    unsent = unsent_bytes(conn.sock)
                    if unsent != conn.write_unsent:
                        conn.write_unsent = unsent
                        conn.write_tick = now
                    else:
                        run(conn.interrupt, "write")
                elif not conn.receiving:
                    continue
                elif conn.partial_tick >= 0:
                    if slow and now - conn.partial_tick >= slow:
                        run(conn.interrupt, "slow")
                elif idle and not conn.inflight and now - conn.active_tick >= idle:
                    run(conn.interrupt, "idle")
                elif age and now - conn.created_tick >= age + (id(conn) >> 4) % (age_jitter + 1) \
                        and not conn.inflight:
                    run(conn.interrupt, "max_age")

    def _raise_fd_limit(self) -> None:
        """Raise the soft open-files limit toward ``max_connections`` plus headroom (as Redis does)."""
        wanted = self.settings.max_connections + 64
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            if target < wanted:
                log.warning("open files limit %d is below max_connections %d + 64", target,
                            self.settings.max_connections)
