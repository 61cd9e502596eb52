"""The server: listeners, connection limits, the timeout watchdog and graceful drain.

A :class:`Server` owns its listeners and acceptors, the admission of new connections (limits, the
PROXY header, the TLS handshake) and the watchdog. What the connections, the built-ins and AUTH
share (settings, counters, command tables, the open connections, the drain flag) is its
:class:`~geventtcp.server.state.ServerState` (``server.state``); a connection gets the state, not
the server. The launcher changes a running server only through :meth:`Server.begin_drain`,
:meth:`Server.stop` and :meth:`Server.set_builtin`.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import math
import resource
import socket
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
from geventtcp.middleware import build_calls, load_middleware
from geventtcp.protocol import PREAUTH_CMDIDS, Request, encode_goaway
from geventtcp.server.builtins import make_builtins
from geventtcp.server.connection import WAITING, Connection
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
from geventtcp.server.state import Handler, ServerState
from geventtcp.sockets import create_listener, format_address, send_and_linger, unsent_bytes
from geventtcp.tls import handshake, peer_certificate, server_context_from_settings
from geventtcp.tracing import server_middleware, tracer_for
from geventtcp.urls import Registry, default_registry

__all__ = ["Server"]

log = logging.getLogger("geventtcp.server")

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

    Tracing: with the ``tracing`` setting on (see :mod:`geventtcp.tracing`), each application
    handler runs in an OpenTelemetry SERVER span; ``tracer_provider`` gives the provider instead of
    the global one (and turns ``auto`` on).
    """

    def __init__(
        self,
        registry: Registry | None = None,
        bind: str | Iterable[str] | None = None,
        *,
        config: Config | None = None,
        listeners: Iterable[Any] | None = None,
        ssl_context: Any = None,
        tracer_provider: Any = None,
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
        self.loop = get_hub().loop
        #: What the connections and built-ins share (they get this, not the server).
        self.state: ServerState[Connection] = ServerState(
            self.settings, self.codec, self.token, self.registry, self.loop, self.plain_sockets)
        self.stats = self.state.stats
        #: Built-ins replaced by :meth:`set_builtin`, applied again by every :meth:`start`.
        self._builtin_overrides: dict[int, Handler] = {}
        self._tracer_provider = tracer_provider
        #: Connections one listener accepts per wakeup; the launcher sets 1 when several worker
        #: processes share a listener, so one worker does not take a whole burst (as gunicorn does).
        self.max_accept: int = StreamServer.max_accept
        self._given_listeners = list(listeners) if listeners is not None else None
        self._own_listeners: list[Any] = []
        self._acceptors: list[_Acceptor] = []
        self._bound: list[tuple[Any, str]] = []
        self._watchdog: gevent.Greenlet | None = None
        self._stopped = Event()

    # -- what the state holds, for introspection and the launcher ------------------------------

    @property
    def connections(self) -> set[Connection]:
        """The open connections (the state's set: read it, do not change it)."""
        return self.state.connections

    @property
    def inflight(self) -> int:
        """Requests handed off to their own greenlet and not yet answered, over all connections."""
        return self.state.inflight

    @property
    def peers(self) -> dict[str, int]:
        """Open connections per peer IP."""
        return self.state.peers

    @property
    def readers(self) -> ReaderPool:
        return self.state.readers

    @property
    def blocking(self) -> set[int]:
        """Application cmdids whose handler has blocked in this process (see ``ServerState.admit``)."""
        return self.state.blocking

    @property
    def calls(self) -> dict[int, Handler]:
        """The command table (built by :meth:`start`; change a built-in with :meth:`set_builtin`)."""
        return self.state.calls

    @property
    def draining(self) -> bool:
        return self.state.draining

    @property
    def drain_reason(self) -> str:
        return self.state.drain_reason

    @property
    def started_at(self) -> float:
        return self.state.started_at

    @property
    def access_log(self) -> Callable[[Connection, Request, int, float], None] | None:
        """Called after each request with (connection, request, code, seconds); ``None``: nothing (free)."""
        return self.state.access_log

    @access_log.setter
    def access_log(self, hook: Callable[[Connection, Request, int, float], None] | None) -> None:
        self.state.access_log = hook

    def begin_drain(self, reason: str) -> None:
        """Flag the drain now: readers that finish a batch send a goaway (``reason``) instead of
        reading on. :meth:`stop` does this too; call it first when the stop itself comes later."""
        self.state.begin_drain(reason)

    def set_builtin(self, cmdid: int, handler: Handler) -> None:
        """Serve ``cmdid`` (a built-in) with ``handler`` from now on, and after every later :meth:`start`."""
        self._builtin_overrides[cmdid] = handler
        state = self.state
        if state.calls:
            state.calls[cmdid] = handler
            if cmdid in state.preauth_calls:
                state.preauth_calls[cmdid] = handler

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return bool(self._acceptors)

    def start(self) -> None:
        """Bind (unless given listeners) and start accepting; returns at once."""
        if self.started:
            return
        self._stopped.clear()
        state = self.state
        state.draining = False
        state.new_context = contextvars.copy_context().copy
        # The application's commands, each in its middleware and concurrency limiter (none: the
        # registry's own callables), composed once here; the built-ins are never wrapped. Tracing,
        # when on, is the outermost middleware, so the others run inside its span.
        middleware = load_middleware(self.settings.middleware)
        tracer = tracer_for(self.settings.tracing, self._tracer_provider)
        if tracer is not None:
            middleware = [server_middleware(tracer, self.registry), *middleware]
        calls: dict[int, Handler] = dict(build_calls(self.registry, middleware))
        state.limited = frozenset(self.registry.limits)
        state.cancel_on_disconnect = frozenset(info.cmdid for info in self.registry if info.cancel_on_disconnect)
        calls.update(make_builtins(state))
        calls.update(self._builtin_overrides)
        state.calls = calls
        state.preauth_calls = {cmdid: calls[cmdid] for cmdid in PREAUTH_CMDIDS}
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
        state.started_at = time.time()
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
        self.state.begin_drain(reason)
        for acceptor in self._acceptors:
            acceptor.close()
        for conn in list(self.state.connections):
            self.loop.run_callback(conn.interrupt, reason)
        if not self.state.all_closed.wait(timeout):
            log.warning("graceful timeout: closing %d connection(s) with requests still running",
                        len(self.state.connections))
        self.close()

    def stop_accepting(self) -> None:
        """Accept no new connection from now on; the listeners stay open (and queue) until stop or close."""
        for acceptor in self._acceptors:
            acceptor.stop_accepting()

    def close(self) -> None:
        """Stop at once: close listeners and connections, kill running handlers."""
        self.state.draining = True
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        for sock in self._own_listeners:
            sock.close()
        self._own_listeners = []
        doomed: list[Any] = []
        for conn in list(self.state.connections):
            doomed.extend(conn.handlers)
            if conn.running is not None and conn.reader is not None:
                doomed.append(conn.reader)  # an inline handler that yielded before its handoff ran
            conn.abort(cancel=False)  # the handlers are killed below instead
        for conn in self.state.orphaned:  # aborted earlier (client gone), their handlers still running
            doomed.extend(conn.orphans or ())
            if conn.running is not None and conn.reader is not None:
                doomed.append(conn.reader)
        self.state.orphaned.clear()
        doomed = list(dict.fromkeys(doomed))  # the connections aborted just above are orphaned too: once each
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
        state = self.state
        if state.draining:
            self._refuse(sock, encode_goaway(self.codec, state.drain_reason), linger=True)
            return
        if len(state.connections) >= self.settings.max_connections:
            self.stats.connections_rejected += 1
            self._refuse(sock, encode_goaway(self.codec, "overloaded", "max number of connections reached"))
            return
        peer = address[0] if isinstance(address, tuple) else None
        if peer is not None:
            if self.protected and not is_loopback(address):
                self.stats.connections_rejected += 1
                log.warning("protected mode: denied non-loopback peer %r", peer)
                self._refuse(sock, encode_goaway(
                    self.codec, "forbidden", "protected mode: no authentication is configured, so only "
                    "loopback clients are accepted (see auth_token, --no-protected-mode)"))
                return
            per_peer = self.settings.max_connections_per_peer
            if per_peer and state.peers.get(peer, 0) >= per_peer:
                self.stats.connections_rejected += 1
                self._refuse(sock, encode_goaway(self.codec, "overloaded", "too many connections from peer"))
                return
        if peer is not None:  # counted from here, so silent TLS handshakes count against the peer too
            state.peers[peer] = state.peers.get(peer, 0) + 1
        if self.ssl_context is not None:
            try:
                sock = handshake(self.ssl_context, sock, self.settings.tls_handshake_timeout)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                self.stats.tls_failures += 1
                log.info("TLS handshake with %r failed: %r", address, exc)
                state.release_peer(peer)
                return
        conn = Connection(state, sock, address or sock.getsockname())
        if self.ssl_context is not None:  # once per TLS connection (request.identity reads it)
            conn.peer_cert = peer_certificate(sock)
        state.connections.add(conn)
        state.all_closed.clear()
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

        The wait counts in the state's ``proxy_pending``, so ``stop()`` does not return (and a worker does
        not exit) under a connection it accepted before draining: that peer would see a bare close.
        """
        state = self.state
        state.proxy_pending += 1
        state.all_closed.clear()
        try:
            address = self._read_proxy_header(sock, address)
            if address is not None and state.draining:
                self._refuse(sock, encode_goaway(self.codec, state.drain_reason), linger=True)
                return None
            return address
        finally:
            state.proxy_pending -= 1
            if not state.proxy_pending and not state.connections:
                state.all_closed.set()

    def _read_proxy_header(self, sock: Any, address: Any) -> Any:
        """See :meth:`_proxy_address`: the header's client address, or ``None`` once closed."""
        if not is_trusted(address, self.proxy_from):
            why: Any = "peer not in proxy_allow_from"
        elif len(self.state.connections) + self.state.proxy_pending > self.settings.max_connections:
            # Counted before the wait (proxy_pending includes this one): a silent header must not
            # hold a descriptor past the limit for proxy_protocol_timeout.
            self.stats.connections_rejected += 1
            self._refuse(sock, encode_goaway(self.codec, "overloaded", "max number of connections reached"))
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
        state = self.state
        while True:
            gevent.sleep(period)
            state.tick += 1
            now = state.tick
            for conn in list(state.connections):
                if auth and now - conn.created_tick >= auth and conn.calls is not state.calls:
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
                elif conn.read_state not in WAITING:
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
