"""Client connection pools: per address (bounded, lazy, checked at checkout) and across addresses (balancing)."""

from __future__ import annotations

import random
import time
from typing import Any

from geventtcp.client import concurrency as _concurrency
from geventtcp.client.batch import BatchingConnection
from geventtcp.client.concurrency import World, fork_generation, real_lock
from geventtcp.client.connection import STALL_AFTER, ClientConnection
from geventtcp.codec import Codec
from geventtcp.errors import ConnectError, remote_error
from geventtcp.protocol import Builtin

__all__ = ["Pool", "Balancer", "connect_backoff"]

#: Reconnect backoff after failed connects (gRPC's connection-backoff shape, shorter for one data
#: centre): first delay, growth factor, jitter as a share of the delay, and the cap, in seconds.
BACKOFF_INITIAL = 0.1
BACKOFF_MULTIPLIER = 1.6
BACKOFF_JITTER = 0.2
BACKOFF_MAX = 5.0
#: Connections a pool closes and reopens, per :data:`REPLACEMENT_WINDOW`, because too many of them landed
#: on one worker process of a listener shared by several (the kernel or the workers' accept race places
#: them): bounded, so a server that says it has workers it never lets accept costs little churn.
MAX_REPLACEMENTS = 8
#: Seconds after which a spent replacement budget renews: where connections land changes (a worker was
#: busy and is not any more, a reload's new workers came up one after the other), so a pool must not
#: stay on one worker for good because its budget went early in its life.
REPLACEMENT_WINDOW = 10.0


def connect_backoff(failures: int) -> float:
    """Seconds an address stays out of rotation after ``failures`` connect failures in a row."""
    delay = min(BACKOFF_MAX, BACKOFF_INITIAL * BACKOFF_MULTIPLIER ** max(0, failures - 1))
    return delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)


class Pool:
    """Up to ``size`` multiplexed connections to one address, for callers of one world.

    ``acquire`` returns the usable connection with the fewest requests in flight (least-in-flight:
    first by server process, HELLO's ``pid``, then by connection), opening another (outside any
    lock) when the bound allows it and that one already has ``share`` requests in flight, is stalled
    behind a slow request (a server answering in request order), or when calls overlap and the pool
    has fewer connections than the server has worker processes behind its listener (HELLO's
    ``workers``); it never waits for a connection to free up, since connections are shared. So one
    gevent Client's load reaches every worker (a connection per worker, retired and reopened, at
    most :data:`MAX_REPLACEMENTS` times per :data:`REPLACEMENT_WINDOW`, while two share a worker),
    while against one process its greenlets still share one connection, which batches best. At
    checkout a connection is dropped when the server closed it while idle (polled without
    blocking), when it was idle for ``idle_timeout`` (kept below the server's own idle timeout, so
    the server never closes one under a request), when a reply is long overdue, or when it was
    inherited across ``fork()``.

    A new connection is wrapped in TLS when ``ssl_context`` is set; with ``hello`` it first sends
    HELLO asking for completion order (protocol 1.1; not waited for), then AUTH with ``auth_token``
    when that is set.

    Failure behaviour: a failed connect raises :class:`ConnectError` (nothing was sent) and takes the
    address out of rotation for a jittered, growing backoff; while it is out, ``acquire`` fails at
    once unless a connection is still open, and after it one caller at a time probes it.
    Who closes what: the pool owns its connections and closes them in :meth:`close`.
    """

    def __init__(self, address: str, world: World, codec: Codec, *, size: int, share: int,
                 connect_timeout: float, idle_timeout: float, validate_after: float, max_reply_bytes: int,
                 ssl_context: Any = None, server_hostname: str | None = None, auth_token: str | None = None,
                 hello: bool = True) -> None:
        self.address = address
        self.world = world
        self.codec = codec
        self.size = max(1, size)
        self.share = max(1, share)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.validate_after = validate_after
        self.fresh_for = min(validate_after, idle_timeout)  # no checkout checks needed before that
        self.max_reply_bytes = max_reply_bytes
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.auth_token = auth_token
        self.hello = hello
        self.conns: list[ClientConnection] = []
        self.connecting = 0
        self.failures = 0
        self.down_until = 0.0
        self.probing = False
        self.last_error = ""
        self.closed = False
        self.opened: Any = None  # set when a connect in progress finishes, for callers waiting on it
        self.replaced = 0  # connections retired to spread over workers in the current window (at most MAX_REPLACEMENTS)
        self.window_start = 0.0  # when the current window's first replacement was made
        self.lock = real_lock()

    def __repr__(self) -> str:
        return f"<Pool {self.address} {len(self.conns)} conn(s), {self.inflight} in flight>"

    @property
    def inflight(self) -> int:
        return sum(len(conn.calls) for conn in self.conns)

    def available(self, now: float) -> bool:
        """In rotation: not backing off after failed connects, or still holding a connection."""
        return (self.down_until <= now and not self.probing) or bool(self.conns)

    def acquire(self, deadline: float, now: float | None = None) -> ClientConnection:
        """A connection to send on; :class:`ConnectError` if none is open and none can be opened.

        While the bound is reached only by connects still in progress, the caller waits (until its
        deadline) for one of them instead of opening more. ``now``, if given, is a ``time.monotonic()``
        reading taken just before (the call's start: one clock reading less per call).
        """
        conns = self.conns
        if len(conns) == 1:  # the common cases, checked without the lock
            conn = conns[0]
            # The fork check reads the counter as a module attribute (no Python call): the client checks
            # at the start of a call only, and a greenlet in a retry's backoff may wake in a forked child.
            if not conn.closed and conn.generation == _concurrency._fork_generation:
                if conn.orphans and not conn.reading:  # replies nobody waits on (send()): read them now
                    conn.poll()
                    now = None
                if now is None:
                    now = time.monotonic()
                if not conn.calls:  # idle and recently used: nothing to validate
                    if now - conn.last_active < self.fresh_for:
                        return conn
                elif len(conn.calls) - conn.orphans < self.share and now - conn.last_reply <= STALL_AFTER \
                        and (conn.server_workers == 1 or self.size == 1):
                    return conn  # replies are flowing: neither stuck nor stalled behind a slow one
        while True:
            now = time.monotonic()
            # A connect counted in ``connecting`` for this caller, given back in ``finally`` whatever
            # happens: a KeyboardInterrupt landing anywhere after the count (Ctrl-C runs its handler
            # wherever the main thread is) must not leave a connect that never ends, which with
            # ``size`` of them made every later call wait for one until its deadline.
            reserved = False
            try:
                with self.lock:
                    if self.closed:
                        raise ConnectError(f"pool for {self.address} is closed")
                    best = self._checkout(now)
                    fresh = best is not None and not best.stalled(now)
                    if best is not None and fresh and len(best.calls) - best.orphans < self.share \
                            and not (best.calls and len(self.conns) < self._per_worker()):
                        return best
                    backing_off = self.down_until > now or (self.probing and self.failures > 0)
                    if backing_off and best is not None:
                        return best
                    if backing_off:
                        wait = max(0.0, self.down_until - now)
                        raise ConnectError(f"{self.address} is out of rotation after {self.failures} failed "
                                           f"connect(s) ({self.last_error}); next try in {wait:.2f}s")
                    opened = None
                    if len(self.conns) + self.connecting < self.size:
                        self.connecting += 1
                        reserved = True  # no signal handler runs between these two stores
                        self.probing = self.failures > 0
                        if self.opened is None:
                            self.opened = self.world.event()
                    elif best is not None and (fresh or not self.connecting):
                        return best
                    else:  # only stalled connections, and one is being opened: wait for it
                        opened = self.opened
                if opened is None:
                    return self._connect(deadline, best)
            finally:
                if reserved:
                    with self.lock:
                        self.connecting -= 1  # first: nothing between the lock and it runs a handler
                        self._connect_done()
            if not opened.wait(max(0.0, deadline - now)):
                raise ConnectError(f"timed out waiting for a connection to {self.address}")

    def _checkout(self, now: float) -> ClientConnection | None:
        """The least busy usable connection (dropping dead, forked or idle ones); holds ``lock``.

        With several connections, least busy means: on the server process (HELLO's ``pid``) with the
        fewest requests in flight over all its connections, then the connection with the fewest, so
        that a pool whose connections landed 3 to 1 on two workers still loads both alike.
        """
        best: ClientConnection | None = None
        conns = self.conns
        if len(conns) > 1:
            return self._checkout_spread(now)
        for conn in conns[:] if len(conns) != 1 else conns:
            if conn.orphans and not conn.reading and not conn.closed:
                conn.poll()  # replies already here (a send()'s, say) must not count as in flight
            if not conn.usable(now, self.validate_after):
                conns.remove(conn)
                break  # the list changed under the loop; one removal per checkout is plenty
            if not conn.calls and now - conn.last_active >= self.idle_timeout:
                conn.close("idle in the pool")
                conns.remove(conn)
                break
            if best is None or len(conn.calls) - conn.orphans < len(best.calls) - best.orphans:
                best = conn
        if best is not None and best.calls and len(conns) > 1 and best.stalled(now):
            # Replies come in request order: prefer a connection not stuck behind a slow request.
            for conn in conns:
                if not conn.stalled(now) and not conn.closed:
                    return conn
        return best

    def _per_worker(self) -> int:
        """Connections wanted as soon as calls overlap: one per worker process of the server (HELLO's
        ``workers``; 1 until a HELLO reply says more), at most ``size``."""
        workers = max(conn.server_workers for conn in self.conns) if self.conns else 1
        return min(workers, self.size)

    def _checkout_spread(self, now: float) -> ClientConnection | None:
        """:meth:`_checkout` for several connections: least-in-flight by server process, then by connection;
        a connection retiring (see :meth:`_spread_over_workers`) gets no new call and closes once idle."""
        conns = self.conns
        loads: dict[int | None, int] = {}
        for conn in conns[:]:
            if conn.orphans and not conn.reading and not conn.closed:
                conn.poll()  # replies already here (a send()'s, say) must not count as in flight
            if not conn.usable(now, self.validate_after):
                conns.remove(conn)
                continue
            if not conn.calls and (conn.retiring or now - conn.last_active >= self.idle_timeout):
                conn.close("retired to spread over workers" if conn.retiring else "idle in the pool")
                conns.remove(conn)
                continue
            pid = conn.server_pid
            loads[pid] = loads.get(pid, 0) + len(conn.calls) - conn.orphans
        if self.replaced >= MAX_REPLACEMENTS and now - self.window_start >= REPLACEMENT_WINDOW:
            self.replaced = 0  # a new window: a new budget
        if self.replaced < MAX_REPLACEMENTS and len(conns) >= self._per_worker() > 1:
            self._spread_over_workers(now)
        best: ClientConnection | None = None
        best_key = (0, 0)
        for conn in conns:
            if conn.retiring:
                continue
            key = (loads[conn.server_pid], len(conn.calls) - conn.orphans)
            if best is None or key < best_key:
                best, best_key = conn, key
        if best is not None and best.calls and best.stalled(now):
            # Replies come in request order: prefer a connection not stuck behind a slow request.
            for conn in conns:
                if not conn.stalled(now) and not conn.closed and not conn.retiring:
                    return conn
        return best

    def _spread_over_workers(self, now: float) -> None:
        """The pool has its connection per worker (or more) and the server has several workers behind one
        listener (HELLO's ``workers``): when more than a fair share of the connections are on one
        worker, retire one of them (it closes once its calls are answered) so that a new one, placed
        anew by the kernel or the workers' accept race, may reach another."""
        conns = self.conns
        workers = max(conn.server_workers for conn in conns)
        if any(conn.retiring or conn.server_pid is None for conn in conns):
            return
        fair = -(-len(conns) // min(workers, len(conns)))  # ceil
        on: dict[int | None, list[ClientConnection]] = {}
        for conn in conns:
            on.setdefault(conn.server_pid, []).append(conn)
        crowded = max(on.values(), key=len)
        if len(crowded) > fair:
            min(crowded, key=lambda c: len(c.calls)).retiring = True
            if not self.replaced:
                self.window_start = now
            self.replaced += 1

    def _connect(self, deadline: float, fallback: ClientConnection | None) -> ClientConnection:
        """Open, set up and add a connection (or return ``fallback`` when the connect fails). The
        caller holds the ``connecting`` count and gives it back; whatever interrupts the set-up
        closes the socket opened."""
        try:
            sock = self.world.connect(self.address, min(self.connect_timeout, max(0.001, deadline - time.monotonic())),
                                      self.ssl_context, self.server_hostname)
        except ConnectError as exc:
            with self.lock:
                self.last_error = str(exc)
                self.failures += 1
                self.down_until = time.monotonic() + connect_backoff(self.failures)
            if fallback is not None:
                return fallback
            raise
        conn = None
        stage = "interrupted while connecting"
        try:
            batching = self.world.name == "gevent" and self.ssl_context is None and hasattr(sock, "_sock")
            conn = (BatchingConnection if batching else ClientConnection)(
                sock, self.address, self.world, self.codec, self.max_reply_bytes)
            if self.hello:
                stage = "HELLO not sent"
                conn.hello(deadline)
            if self.auth_token is not None:
                stage = "authentication failed"
                self._authenticate(conn, deadline)
            with self.lock:
                self.failures = 0
                self.down_until = 0.0
                if self.closed:
                    stage = "pool closed"
                    raise ConnectError(f"pool for {self.address} is closed")
                self.conns.append(conn)
            return conn
        except BaseException:
            if conn is None:
                sock.close()
            else:
                conn.close(stage)
            raise

    def _authenticate(self, conn: ClientConnection, deadline: float) -> None:
        """Send AUTH first; its :class:`RemoteError` (401) propagates as is."""
        reply = conn.request(Builtin.AUTH, {"token": self.auth_token}, deadline)
        assert reply is not None
        if reply["code"]:
            raise remote_error(reply)

    def _connect_done(self) -> None:
        """A connect ended (holds ``lock``; ``connecting`` already counts it out): wake who waits for it."""
        self.probing = False
        opened = self.opened
        if opened is not None and not self.connecting:
            self.opened = None
            opened.set()
        elif opened is not None:  # wake the waiters anyway: a connection may now be there to share
            self.opened = self.world.event()
            opened.set()

    def close(self) -> None:
        """Close every connection; requests still waiting on them fail with MaybeExecuted."""
        with self.lock:
            self.closed = True
            conns, self.conns = self.conns, []
        for conn in conns:
            conn.close()

    def forget_after_fork(self) -> None:
        """In a forked child: drop the inherited descriptors without touching the parent's connections."""
        for conn in self.conns:
            conn.forget_after_fork()
        self.conns = []


class Balancer:
    """The pools of every address for one world; :meth:`pick` chooses where the next call goes.

    Calls go to the in-rotation address with the fewest requests in flight, ties broken round robin.
    When every address is out of rotation, the one whose backoff ends first is returned (its
    ``acquire`` then fails fast or probes it).
    """

    def __init__(self, pools: list[Pool]) -> None:
        self.pools = pools
        #: The pool when there is one address (every call goes there: no pick), else None.
        self.only: Pool | None = pools[0] if len(pools) == 1 else None
        self.generation = fork_generation()
        self._next = 0

    def pick(self, avoid: Pool | None = None) -> Pool:
        pools = self.pools
        count = len(pools)
        if count == 1:
            return pools[0]
        now = time.monotonic()
        start = self._next = (self._next + 1) % count
        best: Pool | None = None
        best_load = 0
        for i in range(count):
            pool = pools[(start + i) % count]
            if pool is avoid or not pool.available(now):
                continue
            load = pool.inflight
            if best is None or load < best_load:
                best, best_load = pool, load
        if best is not None:
            return best
        candidates = [p for p in pools if p is not avoid] or pools
        return min(candidates, key=lambda p: p.down_until)

    def close(self) -> None:
        for pool in self.pools:
            pool.close()

    def forget_after_fork(self) -> None:
        for pool in self.pools:
            pool.forget_after_fork()

    def describe(self) -> list[dict[str, Any]]:
        """Per address: open connections, requests in flight, connect failures in a row."""
        return [{"address": p.address, "connections": len(p.conns), "inflight": p.inflight,
                 "failures": p.failures} for p in self.pools]
