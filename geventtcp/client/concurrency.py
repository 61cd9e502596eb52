"""The two concurrency worlds a client caller can be in (plain threads, or gevent) and their primitives.

A caller is in the *gevent* world when ``socket`` is monkey-patched or its thread already runs a gevent
hub (greenlets without patching); otherwise it is in the *threads* world. The client keeps separate
connections per world (and per hub), because a gevent socket belongs to one hub's thread and a plain
blocking socket would freeze every greenlet of a hub. Nothing here blocks by itself.
"""

from __future__ import annotations

import importlib
import os
import socket as _socket
import time
from collections.abc import Callable
from typing import Any

from gevent import monkey as _monkey

from geventtcp.client.io import GeventIO, ThreadsIO, ThreadsTLSIO
from geventtcp.errors import ConnectError
from geventtcp.sockets import parse_address

__all__ = ["World", "ThreadsWorld", "GeventWorld", "GeventSignal", "THREADS", "current_world", "fork_generation",
           "real_lock"]

# The real (never patched) primitives, whatever was patched before this import.
_allocate_lock: Callable[[], Any] = _monkey.get_original("_thread", "allocate_lock")
_get_ident: Callable[[], int] = _monkey.get_original("_thread", "get_ident")
_Waiter: Any = importlib.import_module("gevent.hub").Waiter
_real_socket: Any = _monkey.get_original("socket", "socket")
_StdSSLSocket: Any = _monkey.get_original("ssl", "SSLSocket")

_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_generation() -> int:
    """A number that changes in a child after ``fork()``: state built before it must not be reused."""
    return _fork_generation


def real_lock() -> Any:
    """A real OS lock (C, fast); only for sections that never block or switch greenlets."""
    return _allocate_lock()


class World:
    """Primitives of one concurrency world; the client picks one per caller with :func:`current_world`."""

    name = "base"
    key: Any = None

    def lock(self) -> Any:
        """A lock that may be held across blocking I/O (``acquire(True, timeout)``, ``release()``)."""
        raise NotImplementedError

    def signal(self) -> Any:
        """An unset one-shot wake-up: ``acquire(True, timeout) -> bool`` waits, ``release()`` sets."""
        raise NotImplementedError

    def event(self) -> Any:
        """An unset event for any number of waiters: ``wait(timeout) -> bool``, ``set()``."""
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` concurrently; return a future (``result(timeout)``, ``done()``)."""
        raise NotImplementedError

    def socket(self, family: int) -> Any:
        raise NotImplementedError

    def io(self, sock: Any) -> Any:
        """Deadline-bounded I/O on a connected socket: ``send_all(data, deadline)``, ``recv(deadline)``
        (both raise ``TimeoutError`` at the ``time.monotonic()`` deadline, ``OSError`` on failure) and
        ``recv_nowait()`` (``None`` when nothing is buffered)."""
        raise NotImplementedError

    def connect(self, address: str, timeout: float, ssl_context: Any = None, server_hostname: str | None = None) -> Any:
        """Open a stream socket to ``address`` (``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH``).

        With ``ssl_context`` the TLS handshake completes within the same ``timeout`` (certificate
        checks are the context's: :func:`geventtcp.tls.client_context` verifies by default), the
        host of ``address`` being the name checked unless ``server_hostname`` is given.
        Raises :class:`ConnectError` (nothing was sent) on any failure, the timeout included; the
        caller owns the returned socket.
        """
        family, addr = parse_address(address)
        deadline = time.monotonic() + timeout
        sock = self.socket(family)
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(addr)
            if family != _socket.AF_UNIX:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                hostname = server_hostname or (addr[0] if family != _socket.AF_UNIX else None)
                sock = self._tls(sock, ssl_context, hostname)
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.do_handshake()
        except OSError as exc:  # ssl.SSLError (a failed certificate check too) is an OSError
            sock.close()
            raise ConnectError(f"cannot connect to {address}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _tls(self, sock: Any, ctx: Any, hostname: str | None) -> Any:
        raise NotImplementedError


class ThreadsWorld(World):
    """Plain threads: real locks, blocking stdlib sockets, a thread pool for concurrent calls."""

    name = "threads"

    def __init__(self) -> None:
        self.key = "threads"  # an instance attribute: read on every call, where a class attribute is a slow lookup
        self._executor: Any = None
        self._executor_pid = -1
        self._guard = _allocate_lock()

    def lock(self) -> Any:
        return _allocate_lock()

    def signal(self) -> Any:
        lock = _allocate_lock()
        lock.acquire()
        return lock

    def event(self) -> Any:
        import threading

        return threading.Event()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def socket(self, family: int) -> Any:
        return _real_socket(family, _socket.SOCK_STREAM)

    def io(self, sock: Any) -> Any:
        return ThreadsTLSIO(sock) if isinstance(sock, _StdSSLSocket) else ThreadsIO(sock)

    def _tls(self, sock: Any, ctx: Any, hostname: str | None) -> Any:
        # The stdlib socket class whatever the context's class (a gevent context would make a
        # cooperative socket, unusable in a thread without a hub).
        return _StdSSLSocket._create(sock=sock, server_hostname=hostname, context=ctx,
                                     do_handshake_on_connect=False)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        with self._guard:
            if self._executor is None or self._executor_pid != _fork_generation:
                self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="geventtcp-client")
                self._executor_pid = _fork_generation
            executor = self._executor
        return executor.submit(fn, *args)


class GeventWorld(World):
    """Greenlets of one hub: gevent locks and sockets (cooperative even without monkey-patching)."""

    name = "gevent"

    def __init__(self, hub: Any) -> None:
        import gevent
        import gevent.lock
        import gevent.socket

        self.key = hub
        self._gevent = gevent
        self._semaphore = gevent.lock.Semaphore
        self._socket = gevent.socket.socket

    def lock(self) -> Any:
        return self._semaphore(1)

    def signal(self) -> Any:
        return GeventSignal(self.key)

    def event(self) -> Any:
        from gevent.event import Event

        return Event()

    def sleep(self, seconds: float) -> None:
        self._gevent.sleep(seconds)

    def socket(self, family: int) -> Any:
        return self._socket(family, _socket.SOCK_STREAM)

    def io(self, sock: Any) -> Any:
        return GeventIO(sock)

    def _tls(self, sock: Any, ctx: Any, hostname: str | None) -> Any:
        from gevent.ssl import SSLSocket

        return SSLSocket(sock=sock, server_hostname=hostname, _context=ctx, do_handshake_on_connect=False)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any:
        from gevent.event import AsyncResult

        result = AsyncResult()

        def run() -> None:
            try:
                value = fn(*args)
            except BaseException as exc:  # handed to whoever waits on the future
                result.set_exception(exc)
            else:
                result.set_result(value)

        self._gevent.spawn(run)
        return result


class GeventSignal:
    """The gevent world's wake-up for one waiting caller: what ``Semaphore(0)`` offers here
    (``acquire(True, timeout) -> bool``, ``acquire(False)``, ``release()``; at most one waiter,
    released at most once per wait), for a fraction of its cost: a libev timer and a
    :class:`gevent.hub.Waiter` per wait instead of a :class:`gevent.Timeout` and link lists.

    A wake-up and the timer may both fire in one loop turn: the waiter takes whichever switches it
    first, and a late switch finds the waiter finished (it then just stores its value, harmlessly;
    each wait has a waiter of its own). ``release()`` from another thread (``Client.close()``
    there) goes through the hub's thread-safe callback queue. A greenlet killed or timed out while
    waiting leaves with its exception; the flag set by a later ``release()`` stays for the next
    ``acquire``.
    """

    __slots__ = ("_hub", "_loop", "_flag", "_waiter")

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._loop = hub.loop
        self._flag = False
        self._waiter: Any = None

    def release(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if _get_ident() == self._hub.thread_ident:
                self._loop.run_callback(waiter.switch, True)
            else:
                self._loop.run_callback_threadsafe(waiter.switch, True)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if self._flag:
            self._flag = False
            return True
        if not blocking or (timeout is not None and timeout <= 0):
            return False
        waiter = self._waiter = _Waiter(self._hub)
        if self._flag:  # released from another thread after the check above, before it saw a waiter
            self._waiter = None
            self._flag = False
            return True
        timer = None
        if timeout is not None:
            timer = self._loop.timer(timeout)
            timer.start(waiter.switch, False)
        try:
            woken: bool = waiter.get()
        finally:
            if self._waiter is waiter:
                self._waiter = None
            if timer is not None:
                timer.close()
        if woken:
            self._flag = False
        return woken


#: The one threads world of this process.
THREADS = ThreadsWorld()


def _patched() -> bool:
    return bool(_monkey.is_module_patched("socket"))


_socket_module: Any = _socket  # ``socket.socket`` is gevent's class once the module is patched
_get_hub_if_exists: Callable[[], Any] = importlib.import_module("gevent._hub_local").get_hub_if_exists


def current_world(mode: str = "auto") -> World:
    """The world of the calling thread/greenlet: ``mode`` is ``auto``, ``threads`` or ``gevent``.

    ``auto`` is gevent when ``socket`` is monkey-patched or the calling thread already has a hub,
    threads otherwise. Cheap enough to call on every request (two lookups in the threads world).
    """
    if mode == "threads":
        return THREADS
    hub = _get_hub_if_exists()
    if hub is None:
        if mode != "gevent" and _socket_module.socket is _real_socket:
            return THREADS
        hub = importlib.import_module("gevent._hub_local").get_hub()
    world: GeventWorld | None = getattr(hub, "_geventtcp_world", None)
    if world is None:
        world = hub._geventtcp_world = GeventWorld(hub)  # lives and dies with its hub
    return world
