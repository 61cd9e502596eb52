"""The blocking client: ``Client(addresses).call(cmdid, params)``, safe from threads, gevent and greenlets."""

from __future__ import annotations

import functools
import random
import time
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from geventtcp.client import concurrency as _concurrency
from geventtcp.client.concurrency import World, current_world, fork_generation, real_lock
from geventtcp.client.connection import ClientConnection
from geventtcp.client.pool import Balancer, Pool
from geventtcp.codec import get_codec
from geventtcp.errors import (
    RETRYABLE_CODES,
    CallTimeout,
    ConnectError,
    GeventTCPError,
    MaybeExecuted,
    NotSent,
    RemoteError,
    TransportError,
    Unprocessed,
    remote_error,
)
from geventtcp.protocol import READ_ONLY_BUILTINS, Builtin, encode_meta
from geventtcp.sockets import parse_address
from geventtcp.tracing import ClientTracing, client_tracing

__all__ = ["Client", "DEFAULT_TIMEOUT", "DEFAULT_CONNECT_TIMEOUT"]

#: Default overall time of one call, all attempts included (the server's default handler deadline).
DEFAULT_TIMEOUT = 30.0
#: Default time to open one connection (gRPC uses 20 s across the internet; this is for one site).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Longest timeout honoured (poll() and lock waits take at most ~24 days); longer ones are cut to it.
#: Well below ``protocol.MAX_TIMEOUT_MS``, so the ``timeout_ms`` a request carries is always valid.
_MAX_TIMEOUT = 7 * 86400.0
#: Failures after which a request may be sent again whatever the command: it never reached a handler.
_SAFE = (NotSent, ConnectError, Unprocessed)


class Client:
    """Calls to one or more geventtcp servers over persistent, multiplexed connections.

    ``Client("host:port")`` or ``Client(["h1:p", "h2:p"])``; addresses are ``HOST:PORT``,
    ``[IPv6]:PORT`` or ``unix:PATH``. One client may be shared by any number of threads and greenlets:
    each world (plain threads; each gevent hub) gets its own connections, opened lazily, at most
    ``pool_size`` per address, each carrying many requests at once. A call goes to the connection
    with the fewest requests in flight (by server process first); greenlets share a connection until
    ``multiplex`` requests are in flight on it (the server's ``max_inflight_per_connection`` is 128),
    since one connection batches best, except that a server with several worker processes behind
    one listener (its HELLO reply says how many) gets one connection per worker as soon as calls
    overlap (up to ``pool_size``), so that the load reaches all of them. Threads take a connection
    each while the bound allows (a thread alone on one reads its own replies without waking another).
    ``unordered`` (default true) asks each new connection for protocol 1.1's completion order (a
    HELLO, not waited for): a fast call is then never queued behind a slow one on its connection.
    A server before 1.1 answers the HELLO 404 and keeps request order. See docs/client.md.

    Settings: ``timeout`` bounds a whole call, retries included, and is sent to the server as the
    request's deadline; ``connect_timeout`` bounds each connect; ``retries`` is how many times a
    call may be sent again when that is safe (see :meth:`call`); ``idempotent`` lists cmdids that may
    be sent again even after an unknown outcome; ``idle_timeout`` closes pooled connections unused
    that long (keep it below the server's ``idle_timeout``, 300 s by default); ``mode`` forces the
    world (``threads`` or ``gevent``) instead of detecting it per caller (``auto``).

    Security: ``ssl_context`` turns TLS on (build it with :func:`geventtcp.tls.client_context`, which
    verifies the server's certificate by default and can present a client certificate); the name
    checked is the address's host unless ``server_hostname`` is given. ``auth_token`` is sent with the
    AUTH command on every new connection before anything else; a wrong one raises
    :class:`~geventtcp.errors.Unauthenticated`.

    Metadata: ``meta`` (a dict of str to str, the rules of :mod:`geventtcp.protocol`) is sent with
    every request; a call's own ``meta=`` is merged over it. ``tracing`` (``auto``, ``on``, ``off``)
    makes each call a CLIENT span of OpenTelemetry and sends the current trace context in ``meta``
    (``traceparent``/``tracestate``): ``auto`` does when ``opentelemetry-api`` is installed and a
    tracer provider is set when the client is created (or ``tracer_provider`` is given); with
    tracing off a call costs what it cost without it (see :mod:`geventtcp.tracing`).

    Who closes what: the client owns every connection; :meth:`close` (or leaving ``with``) closes them,
    after which calls raise :class:`NotSent`. After ``fork()`` a child opens its own connections and
    never uses or shuts down the parent's.
    """

    def __init__(
        self,
        addresses: str | Iterable[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        pool_size: int = 4,
        multiplex: int = 128,
        retries: int = 2,
        idempotent: Iterable[int] = (),
        idle_timeout: float = 240.0,
        validate_after: float = 1.0,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        max_reply_bytes: int = (16 << 20) + 1,
        codec: str = "simplejson",
        mode: str = "auto",
        ssl_context: Any = None,
        server_hostname: str | None = None,
        auth_token: str | None = None,
        meta: Mapping[str, str] | None = None,
        tracing: str = "auto",
        tracer_provider: Any = None,
        unordered: bool = True,
    ) -> None:
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("Client needs at least one address")
        for address in self.addresses:
            parse_address(address)  # ConfigError now for a malformed address, not at the first call
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError("timeout and connect_timeout must be positive (a call never waits forever)")
        if mode not in ("auto", "threads", "gevent"):
            raise ValueError("mode must be 'auto', 'threads' or 'gevent'")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.pool_size = pool_size
        self.multiplex = max(1, multiplex)
        self.retries = max(0, retries)
        self.idempotent = frozenset(idempotent) | READ_ONLY_BUILTINS
        self.idle_timeout = idle_timeout
        self.validate_after = validate_after
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_reply_bytes = max_reply_bytes
        self.codec = get_codec(codec)
        self.mode = mode
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.auth_token = auth_token
        #: Sent with every request (a call's own ``meta`` is merged over it). Read-only (a mapping
        #: proxy): its line is encoded once, here, so a change would reach only the calls that pass
        #: their own ``meta``; a per-request value goes in ``call(..., meta=...)``.
        self.meta: Mapping[str, str] = types.MappingProxyType(dict(meta) if meta else {})
        #: ``self.meta`` as the request field, encoded once (``b""`` when empty).
        self._meta_line = encode_meta(self.codec, self.meta) if self.meta else b""
        #: ``None`` with tracing off: then a call pays nothing for tracing.
        self._tracing: ClientTracing | None = client_tracing(tracing, tracer_provider)
        self.unordered = unordered
        self.closed = False
        self._balancers: dict[Any, Balancer] = {}
        self._generation = fork_generation()
        self._lock = real_lock()

    def __repr__(self) -> str:
        return f"<Client {','.join(self.addresses)}{' closed' if self.closed else ''}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------------

    def call(self, cmdid: int, params: Any = None, timeout: float | None = None,
             idempotent: bool | None = None, *, meta: Mapping[str, str] | None = None,
             _deadline: float | None = None, _meta_line: bytes | None = None) -> Any:
        """Send a request and return the reply's ``data``.

        Raises the :class:`RemoteError` subclass of a nonzero reply code (``errors.ERROR_CLASSES``),
        or a transport error: :class:`ConnectError`/:class:`NotSent` (never sent),
        :class:`Unprocessed` (the server said it did not process it), :class:`MaybeExecuted` (the
        connection broke after the request was written), :class:`CallTimeout` (no reply in time; a
        MaybeExecuted too). ``TypeError``/``ValueError`` if ``params`` has no JSON form, or one the
        server would refuse (NaN, a lone surrogate, keys colliding as JSON): nothing is sent then.

        Within ``timeout`` (default: the client's) the request is sent again, up to ``retries`` times
        with jittered exponential backoff and preferably to another address, only when that cannot run
        it twice: it was never sent, the server answered 503 or sent goaway (the handler did not run),
        or, for a MaybeExecuted, the command is idempotent (``idempotent=True`` here, or its cmdid in
        the client's ``idempotent`` set). A timeout is never retried.

        ``meta`` is merged over the client's ``meta`` and sent as the request's metadata;
        ``ValueError`` (nothing sent) when it breaks the protocol's rules for ``meta``.

        ``_deadline`` (internal, from :meth:`call_async`) is the absolute ``time.monotonic()`` deadline
        fixed when the call was submitted; it replaces ``timeout``. ``_meta_line`` (internal, from
        tracing) is the request's ``meta`` field already encoded.
        """
        if _meta_line is None:
            if self._tracing is not None:
                return self._tracing.call(self, cmdid, params, timeout, idempotent, meta, _deadline)
            _meta_line = self._meta_line if meta is None else self._encode_meta(meta)
        # _start's work, inline (every call's path): the deadline, then the caller's world's pool
        start = time.monotonic()
        if _deadline is None:
            if timeout is None:
                timeout = self.timeout
            deadline = start + (timeout if timeout < _MAX_TIMEOUT else _MAX_TIMEOUT)
        else:
            deadline = _unexpired(_deadline)
        balancer = self._balancers.get(current_world(self.mode).key)
        if balancer is None or self._generation != _concurrency._fork_generation:
            balancer = self._balancer(current_world(self.mode))
        pool = balancer.only
        if pool is None:
            pool = balancer.pick()
        attempt = 0
        conn = None
        now: float | None = start  # the first checkout's clock reading; later ones read it afresh
        while True:
            try:
                conn = pool.acquire(deadline, now)
                now = None
                reply = conn.request(cmdid, params, deadline, False, _meta_line)
            except _SAFE as exc:
                now = None
                if _retired_under(conn, exc):
                    conn = None
                    continue
                error: GeventTCPError = exc
            except CallTimeout:
                raise
            except MaybeExecuted as exc:
                if not (idempotent if idempotent is not None else cmdid in self.idempotent):
                    raise
                error = exc
            else:
                assert reply is not None
                code = reply["code"]
                if code == 0:
                    return reply.get("data")
                error = remote_error(reply)
                if code not in RETRYABLE_CODES:
                    raise error
            attempt += 1
            pool = self._retry(attempt, error, deadline, pool)

    def _encode_meta(self, meta: Mapping[str, str] | None) -> bytes:
        """The request field for ``meta`` merged over the client's ``meta`` (``b""`` when both are
        empty); ``ValueError`` when the result breaks the protocol's rules."""
        if not meta:
            return self._meta_line
        return encode_meta(self.codec, {**self.meta, **meta} if self.meta else meta)

    def _start(self, timeout: float | None, deadline: float | None) -> tuple[float, Pool]:
        """The deadline of a send and where its first attempt goes; NotSent when the deadline fixed
        at submission passed while the call waited to start (:meth:`call` does the same inline)."""
        if deadline is None:
            if timeout is None:
                timeout = self.timeout
            deadline = time.monotonic() + (timeout if timeout < _MAX_TIMEOUT else _MAX_TIMEOUT)
        else:
            deadline = _unexpired(deadline)
        balancer = self._balancer(current_world(self.mode))
        pool = balancer.only
        return deadline, pool if pool is not None else balancer.pick()

    def _balancer(self, world: World) -> Balancer:
        """The balancer of ``world``'s connections: made on its first call, and afresh in a forked child."""
        if self._generation != _concurrency._fork_generation:
            self._after_fork()
        balancer = self._balancers.get(world.key)
        return balancer if balancer is not None else self._new_balancer(world)

    def _retry(self, attempt: int, error: GeventTCPError, deadline: float, failed: Pool) -> Pool:
        """Decide on retry ``attempt`` after ``error`` (a kind safe to resend): re-raise ``error`` when
        retries are used up, the client is closed, or the deadline would pass during the backoff;
        otherwise sleep the backoff (none right after a goaway) and pick where the retry goes."""
        if attempt > self.retries or self.closed:
            raise error
        delay = 0.0 if isinstance(error, Unprocessed) and attempt == 1 else \
            random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        if time.monotonic() + delay >= deadline:
            raise error
        world = current_world(self.mode)
        if delay:
            world.sleep(delay)
        return self._balancer(world).pick(avoid=failed)

    def send(self, cmdid: int, params: Any = None, timeout: float | None = None, *,
             meta: Mapping[str, str] | None = None) -> None:
        """Fire and forget: return once the request line is written; its reply is read later and dropped.

        Guarantees: when ``send`` returns, the whole line was written to a connection (the server will
        run it unless that connection breaks first); the reply is consumed by the connection's next
        reader and dropped (a nonzero code is logged at INFO on ``geventtcp.client``), so it can never
        reach another caller. ``timeout`` bounds the write and is the server-side deadline. Raises
        :class:`ConnectError`/:class:`NotSent` when the line could not be written (retried as in
        :meth:`call` first); nothing tells whether the handler succeeded. ``meta`` as in :meth:`call`;
        with tracing on, the current trace context is sent (no span: nothing waits for the reply).
        """
        meta_line = self._encode_meta(meta) if self._tracing is None else self._tracing.send_meta(self, meta)
        deadline, pool = self._start(timeout, None)
        attempt = 0
        conn = None
        while True:
            try:
                conn = pool.acquire(deadline)
                conn.request(cmdid, params, deadline, True, meta_line)
                return
            except _SAFE as exc:
                if _retired_under(conn, exc):
                    conn = None
                    continue
                attempt += 1
                pool = self._retry(attempt, exc, deadline, pool)

    def call_async(self, cmdid: int, params: Any = None, timeout: float | None = None,
                   idempotent: bool | None = None, *, meta: Mapping[str, str] | None = None) -> Any:
        """Start :meth:`call` concurrently and return a future of its result.

        In the threads world it is a ``concurrent.futures.Future`` (run on a small thread pool); in
        the gevent world a ``gevent.event.AsyncResult`` (run in a new greenlet). Both offer
        ``result(timeout=None)`` and ``done()``; ``result`` raises what ``call`` would.

        ``timeout`` counts from now, not from when a pool thread starts the call: a call still
        queued behind busy threads when it expires fails with :class:`NotSent`, never sent.

        ``meta`` as in :meth:`call`. With tracing on, the call's span is a child of the span current
        here, where the call is submitted (not of whatever the pool thread runs in).
        """
        deadline = time.monotonic() + min(_MAX_TIMEOUT, self.timeout if timeout is None else timeout)
        world = current_world(self.mode)
        call: Callable[..., Any] = functools.partial(self.call, meta=meta, _deadline=deadline)
        if self._tracing is not None:
            call = self._tracing.bind(call)
        return world.spawn(call, cmdid, params, None, idempotent)

    def ping(self, timeout: float | None = None) -> Any:
        """The server's built-in health check: ``{"pong": true, "draining": ..., "pid": ..., "protocol": 1}``."""
        return self.call(Builtin.PING, None, timeout)

    def list(self, timeout: float | None = None) -> Any:
        """The server's registered commands: ``[{"cmdid", "name", "doc", "idempotent"}, ...]``, plus
        ``"params"`` (the params' JSON Schema) for a command registered with ``params=``."""
        return self.call(Builtin.LIST, None, timeout)

    def stats(self, timeout: float | None = None) -> Any:
        """The server's counters: ``{"commands": {cmdid: {...}}, "connections": ..., ...}`` (under the
        launcher, the ``workers`` of every worker, whichever worker answers)."""
        return self.call(Builtin.STATS, None, timeout)

    # -- connections -----------------------------------------------------------------------------

    def _new_balancer(self, world: World) -> Balancer:
        if self.closed:
            raise NotSent("the client is closed")
        with self._lock:
            if self.closed:  # close() ran whole since the check above: nothing may be opened now
                raise NotSent("the client is closed")
            balancer = self._balancers.get(world.key)
            if balancer is None:
                balancer = self._balancers[world.key] = Balancer([
                    Pool(address, world, self.codec, size=self.pool_size,
                         share=1 if world.name == "threads" else self.multiplex,
                         connect_timeout=self.connect_timeout, idle_timeout=self.idle_timeout,
                         validate_after=self.validate_after, max_reply_bytes=self.max_reply_bytes,
                         ssl_context=self.ssl_context, server_hostname=self.server_hostname,
                         auth_token=self.auth_token, hello=self.unordered)
                    for address in self.addresses
                ])
        return balancer

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's connections (descriptors only) and start afresh."""
        old = self._balancers
        self._balancers = {}
        self._lock = real_lock()
        self._generation = fork_generation()
        for balancer in old.values():
            balancer.forget_after_fork()

    def close(self) -> None:
        """Close every connection; calls in flight fail with MaybeExecuted, later ones with NotSent."""
        self.closed = True
        with self._lock:
            balancers = list(self._balancers.values())
            self._balancers = {}
        for balancer in balancers:
            balancer.close()

    def describe(self) -> dict[str, Any]:
        """Connections and requests in flight per world and address (for debugging and tests)."""
        return {getattr(key, "name", str(key)) if isinstance(key, str) else f"gevent-hub-{id(key):x}":
                balancer.describe() for key, balancer in list(self._balancers.items())}


def _unexpired(deadline: float) -> float:
    """``deadline``, fixed when a call was submitted (``call_async``), unless it passed while the call
    waited to start: then NotSent."""
    if deadline <= time.monotonic():
        raise NotSent("the call's timeout expired while it waited to start; it was never sent")
    return deadline


def _retired_under(conn: ClientConnection | None, exc: Exception) -> bool:
    """``exc`` is the NotSent of a request on ``conn``, a connection the pool retired (to spread over
    workers) and closed, idle, between the checkout and the request's registration (another thread's
    checkout ran in between): nothing was sent and nothing failed, so the caller checks out again at
    once, without using an attempt (a closed connection leaves the pool, and a pool retires at most
    ``MAX_REPLACEMENTS`` connections, so this repeats a bounded number of times). Only when ``conn`` is
    closed: a NotSent it is still open after (the deadline passed before the line was numbered) is
    the call's own, and a pool's lone retiring connection would be checked out again for ever."""
    return conn is not None and conn.retiring and conn.closed and type(exc) is NotSent


# Re-exported for ``from geventtcp.client import ...`` convenience.
__all__ += ["RemoteError", "TransportError", "NotSent", "Unprocessed", "MaybeExecuted", "CallTimeout",
            "ConnectError"]
