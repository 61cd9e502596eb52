"""Deadline-bounded socket I/O for client connections, one flavour per concurrency world.

Each class offers ``send_all(data, deadline)`` and ``recv(deadline)`` (``TimeoutError`` without an
``errno`` at the ``time.monotonic()`` deadline; ``OSError`` on failure, the kernel's ``ETIMEDOUT``
included), ``recv_nowait()`` (``None`` when nothing is buffered) and ``readable()`` (never
blocks). None of them closes the socket: its connection does.
"""

from __future__ import annotations

import math
import os as _os
import select
import socket as _socket
import ssl
import struct
import threading as _threading
import time
from typing import Any

from gevent import Timeout as _Timeout
from gevent import monkey as _monkey

__all__ = ["ThreadsIO", "ThreadsTLSIO", "GeventIO", "RECV_SIZE", "shutdown"]

#: Bytes asked of the kernel per ``recv``.
RECV_SIZE = 65536

# The real (never patched) primitives, whatever was patched before this import.
_allocate_lock: Any = _monkey.get_original("_thread", "allocate_lock")
_original_poll: Any = _monkey.get_original("select", "poll")
_DONTWAIT = getattr(_socket, "MSG_DONTWAIT", 0)
_read: Any = _monkey.get_original("os", "read")
_get_ident: Any = _monkey.get_original("_thread", "get_ident")
#: The OS thread that runs Python's signal handlers and is interrupted by signals sent to the process
#: (the kernel gives them to the main thread first). Read with the real ``get_ident``: gevent's
#: patching renumbers ``threading``'s main thread after the greenlet.
_MAIN_THREAD: int | None = (
    _get_ident() if _threading.current_thread() is _threading.main_thread() else _threading.main_thread().ident)


def _main_thread_after_fork() -> None:
    """In a forked child the thread that forked is the main one (Python's and the kernel's)."""
    global _MAIN_THREAD
    _MAIN_THREAD = _get_ident()


_os.register_at_fork(after_in_child=_main_thread_after_fork)
#: The most by which the kernel ends a read bounded by ``SO_RCVTIMEO`` after the bound: it rounds the
#: bound up to whole ticks and its timer wheel up to a granularity of at most 1/8 of the timeout (Linux),
#: so ``bound * _SLACK_SHARE + _SLACK_TICKS`` (two ticks at the coarsest 100 Hz).
_SLACK_SHARE = 1.125
_SLACK_TICKS = 0.02
#: Seconds left to a deadline below which a read polls instead of relying on ``SO_RCVTIMEO``: with less,
#: half of it plus the kernel's lateness could pass the deadline.
_POLL_BELOW = 0.05


def shutdown(sock: Any) -> None:
    """Shut the descriptor down (waking a thread blocked on it) without touching TLS state, which
    ``SSLSocket.shutdown`` would drop under a reader still using it. Never raises."""
    raw = sock if isinstance(sock, _socket.socket) else getattr(sock, "_sock", None)
    try:
        if raw is not None:
            _socket.socket.shutdown(raw, _socket.SHUT_RDWR)
    except OSError:
        pass


class ThreadsIO:
    """A blocking socket whose reads are bounded by the kernel's receive timeout (``SO_RCVTIMEO``).

    The socket's own (Python) timeout is never changed, because a reader and a writer in two
    threads would race on it, and a Python timeout polls before each read anyway. ``SO_RCVTIMEO``
    bounds reads only (writes never wait in the kernel: ``MSG_DONTWAIT``), and one reader at a time
    holds the connection's reader role, so it has a single user: a read is one ``recv`` instead of
    ``poll`` then ``recv`` (the ``poll`` was ~15 % of a lone call's CPU). Where the option cannot be
    set, reads ``poll`` first as before.

    Not in the main thread: Python restarts a ``recv`` interrupted by a signal whose handler returned
    (PEP 475), and the kernel then starts ``SO_RCVTIMEO`` afresh, so a signal coming more often than
    the bound (a program's periodic ``SIGALRM``) would keep a read waiting past its deadline for as
    long as the signals come. Signals sent to the process interrupt the main thread, so its reads
    ``poll`` first, whose timeout Python recomputes on each restart (as it does in every thread).
    """

    __slots__ = ("sock", "_fd", "_poller", "_rcvtimeo", "_polling", "taking")

    def __init__(self, sock: Any) -> None:
        sock.settimeout(None)
        self.sock = sock
        # Reads are ``os.read`` of the descriptor (``read(2)`` on a stream socket is ``recv`` without
        # flags), whose argument parsing costs a fraction of ``socket.recv``'s. The descriptor is
        # read only by the connection's reader, and the connection closes the socket only once
        # nobody reads (ClientConnection), so it never names another file while read here.
        self._fd: int = sock.fileno()
        self._poller = _original_poll()
        self._poller.register(self._fd, select.POLLIN)
        # The time a read bounded by the kernel may take, its lateness included: a read with less time
        # left sets a new bound first (none yet: inf; always while polling).
        self._rcvtimeo = math.inf
        self._polling = False  # set for good when SO_RCVTIMEO cannot be set
        # True while a read that polled may be taking bytes out of the socket: an exception then (a
        # signal handler's, run in this thread right after ``read(2)`` returned) may carry away
        # bytes of the stream, so the connection cannot be trusted (ClientConnection._lead).
        self.taking = False

    def send_all(self, data: bytes, deadline: float) -> None:
        sock = self.sock
        try:  # the kernel usually takes a request line whole: no view, no loop
            sent = sock.send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = sock.send(view, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent:
                view = view[sent:]
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out writing the request")
            poller = _original_poll()
            poller.register(sock.fileno(), select.POLLOUT)
            poller.poll(math.ceil(remaining * 1000))

    def recv(self, deadline: float) -> bytes:
        main = _get_ident() == _MAIN_THREAD  # signals interrupt this thread: poll (see the class)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0.0:  # float constants: a float and an int take the slow path
                raise TimeoutError("timed out waiting for the reply")
            if main or (remaining < self._rcvtimeo and not self._bound(remaining)):
                if self._poller.poll(remaining * 1000.0):  # in ms, a float: poll rounds it up
                    self.taking = True
                    data: bytes = _read(self._fd, RECV_SIZE)
                    self.taking = False
                    return data
                continue
            try:
                data = _read(self._fd, RECV_SIZE)
                return data
            except BlockingIOError:  # the kernel's bound passed (before the deadline): check again
                continue

    def _bound(self, remaining: float) -> bool:
        """Bound the kernel's wait on a read so that it ends by ``remaining`` seconds, the kernel's
        lateness included (:data:`_SLACK_SHARE`, :data:`_SLACK_TICKS`); False where the bound cannot be
        set, or when less than :data:`_POLL_BELOW` remains (then reads poll, whose timeout is exact to
        the ms). Half of it, so that the next calls with the same timeout (about as much remaining
        each) keep it without a ``setsockopt``: the bound may end a wait early, which costs one more
        ``recv``, never late."""
        if self._polling or remaining < _POLL_BELOW:
            return False
        bound = remaining / 2
        seconds = int(bound)
        try:
            self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO,
                                 struct.pack("ll", seconds, int((bound - seconds) * 1e6)))
        except (OSError, struct.error):
            self._polling = True
            return False
        self._rcvtimeo = bound * _SLACK_SHARE + _SLACK_TICKS  # at most ``remaining`` (see _POLL_BELOW)
        return True

    def readable(self) -> bool:
        return bool(self._poller.poll(0))

    def recv_nowait(self) -> bytes | None:
        try:
            data: bytes = self.sock.recv(RECV_SIZE, _DONTWAIT)
        except BlockingIOError:
            return None
        return data


class ThreadsTLSIO:
    """A non-blocking TLS socket driven with ``poll``. OpenSSL must not run a read and a write on one
    connection at once, so each (never blocking) SSL call holds a lock; waits happen outside it."""

    __slots__ = ("sock", "_lock", "_poller", "taking")

    def __init__(self, sock: Any) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._lock = _allocate_lock()
        self._poller = _original_poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self.taking = False  # as ThreadsIO's: an exception while true may carry decrypted bytes away

    def _wait(self, events: int, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out {what}")
        poller = _original_poll()
        poller.register(self.sock.fileno(), events)
        poller.poll(math.ceil(remaining * 1000))

    def send_all(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            want = select.POLLOUT
            with self._lock:
                try:
                    sent = self.sock.send(view)
                except ssl.SSLWantReadError:
                    sent, want = 0, select.POLLIN
                except (ssl.SSLWantWriteError, BlockingIOError):
                    sent = 0
            if sent:
                view = view[sent:]
            else:
                self._wait(want, deadline, "writing the request")

    def recv(self, deadline: float) -> bytes:
        while True:
            want = select.POLLIN
            data: bytes | None = None
            with self._lock:
                # ``taking`` from before OpenSSL's read (the signal check after it runs in ssl.py) to
                # the return, past the signal check that ends the ``with``: a Ctrl-C there carries the
                # bytes away, and the reader must fail the connection (ClientConnection._lead).
                self.taking = True
                try:
                    data = self.sock.recv(RECV_SIZE)
                except ssl.SSLWantWriteError:
                    self.taking = False
                    want = select.POLLOUT
                except (ssl.SSLWantReadError, BlockingIOError):
                    self.taking = False
            if data is not None:
                self.taking = False
                return data
            self._wait(want, deadline, "waiting for the reply")

    def readable(self) -> bool:
        return self.sock.pending() > 0 or bool(self._poller.poll(0))

    def recv_nowait(self) -> bytes | None:
        with self._lock:
            try:
                data: bytes = self.sock.recv(RECV_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return None
        return data


class GeventIO:
    """A gevent socket (plain or TLS) shared by the greenlets of one hub.

    The socket's own timeout stays ``None`` for good: it is one field shared by every greenlet, and
    gevent's TLS read and write loops re-read it after each wake-up, so a reader setting a short
    timeout would cut short a writer's wait in another greenlet. Each blocking operation is bounded
    by its own :class:`gevent.Timeout` instead, which belongs to the greenlet that started it.
    """

    __slots__ = ("sock", "_poller", "_raw_recv", "_raw_send", "taking", "_pid")

    def __init__(self, sock: Any) -> None:
        sock.settimeout(None)
        self.sock = sock
        self._poller = _original_poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        # Plain sockets: the OS socket (non-blocking under gevent) for the first, never waiting, try.
        raw = None if hasattr(sock, "pending") else getattr(sock, "_sock", None)
        self._raw_recv: Any = None if raw is None else raw.recv
        self._raw_send: Any = None if raw is None else raw.send
        # As ThreadsIO's: true from a read to its return. A Ctrl-C runs its handler in
        # the main greenlet wherever it is, so also right after ``recv(2)`` returned, carrying bytes
        # of the stream away (ClientConnection._lead then fails the connection).
        self.taking = False
        self._pid = _os.getpid()  # a reader waiting across gevent.fork() wakes in the child too

    def readable(self) -> bool:
        # poll(0) never blocks, so the real poll is fine in a greenlet; TLS may hold decrypted bytes.
        pending = getattr(self.sock, "pending", None)
        return (pending is not None and pending() > 0) or bool(self._poller.poll(0))

    def send_all(self, data: bytes, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out writing the request")
        raw_send = self._raw_send
        if raw_send is not None:  # plain socket: the kernel usually takes it all at once, no timer needed
            try:
                sent = raw_send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        timer = _Timeout(remaining)
        timer.start()
        try:
            self.sock.sendall(data)
        except _Timeout as exc:
            if exc is not timer:
                raise
            raise TimeoutError("timed out writing the request") from None
        finally:
            timer.close()

    def recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for the reply")
        # Read here, not in gevent's read loop: bytes already there need no timer, and ``taking`` spans
        # the read to its return. TLS: OpenSSL's own read (as recv_nowait), which never waits.
        raw_recv = self._raw_recv
        sock = self.sock
        while True:
            event = sock._read_event
            ready: bytes | None = None
            self.taking = True
            try:
                ready = raw_recv(RECV_SIZE) if raw_recv is not None else sock._sslobj.read(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except ssl.SSLWantWriteError:
                event = sock._write_event
            except ssl.SSLEOFError:  # closed without close_notify: EOF, as gevent's read has it (ragged EOFs)
                ready = b""
            self.taking = False
            if ready is not None:
                return ready
            self._wait_for(event, deadline)
            if _os.getpid() != self._pid:  # woken in a forked child: the bytes are the parent's
                raise OSError("the connection was inherited across fork: the child does not read it")

    def _wait_for(self, event: Any, deadline: float) -> None:
        """Wait (this greenlet) for the socket's read or write ``event``; TimeoutError at ``deadline``.
        Whatever interrupts the wait (a timeout, a kill, a Ctrl-C) took no byte."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for the reply")
        timer = _Timeout(remaining)
        timer.start()
        try:
            self.sock._wait(event)
        except _Timeout as exc:
            if exc is not timer:
                raise
            raise TimeoutError("timed out waiting for the reply") from None
        finally:
            timer.close()

    def recv_nowait(self) -> bytes | None:
        raw_recv = self._raw_recv
        if raw_recv is not None:
            try:
                data: bytes = raw_recv(RECV_SIZE)
            except BlockingIOError:
                return None
            return data
        # TLS: bytes on the socket may be only part of a record. OpenSSL's own read takes whatever
        # is decryptable now and never waits (the socket under a gevent SSL socket is non-blocking),
        # so it never switches greenlets: this runs under the pool's lock, a real lock, where a
        # switch (gevent's SSL read waits for the rest of a record) let the next greenlet to check
        # out block the thread, and so the hub, for good.
        if not self.readable():
            return None
        try:
            data = self.sock._sslobj.read(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except ssl.SSLEOFError:  # closed without close_notify: EOF, as gevent's read has it (ragged EOFs)
            return b""
        return data
