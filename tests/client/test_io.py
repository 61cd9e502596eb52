"""GeventIO: per-operation deadlines that concurrent greenlets on one socket cannot disturb; ThreadsIO:
reads bounded by the kernel's receive timeout keep their deadlines exactly as the poll did."""

import socket
import ssl
import struct
import threading
import time

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl

from geventtcp.client.io import GeventIO, ThreadsIO
from tests.support.certs import make_pki
from tests.support.system import in_thread


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("clientio-pki")))


def _pair(pki, tls):
    """A connected (client, peer) pair of gevent sockets on loopback with small buffers, so a big
    write waits on the peer's reads; TLS on both ends when ``tls``."""
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = gsocket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    client.connect(listener.getsockname())
    peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    listener.close()
    if tls:
        server_ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
        client_ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.load_verify_locations(pki.ca)
        handshake = gevent.spawn(server_ctx.wrap_socket, peer, server_side=True)
        client = client_ctx.wrap_socket(client, server_hostname="localhost")
        peer = handshake.get(timeout=10)
    return client, peer


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_short_reader_deadline_does_not_cut_a_concurrent_write_short(pki, tls):
    """One greenlet writes 512 KiB to a peer that reads (at most 64 KiB) every 50 ms (a 10 s deadline); another
    keeps waiting for bytes with 20 ms deadlines. Each read times out on its own deadline and the
    write completes: a deadline set on the shared socket would end the writer's next wait in 20 ms."""
    client, peer = _pair(pki, tls)
    io = GeventIO(client)
    payload = b"x" * (512 << 10)
    received = bytearray()

    def slow_reader():
        while len(received) < len(payload):
            chunk = peer.recv(65536)
            if not chunk:
                return
            received.extend(chunk)
            gevent.sleep(0.05)

    reading = gevent.spawn(slow_reader)
    writer = gevent.spawn(io.send_all, payload, time.monotonic() + 10)
    timeouts = 0
    try:
        while not writer.ready():
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                io.recv(started + 0.02)
            assert time.monotonic() - started < 1.0  # the reader's own deadline holds too
            timeouts += 1
        writer.get()  # raises if the write was cut short
        reading.get(timeout=10)
        assert bytes(received) == payload
        assert timeouts >= 5
    finally:
        gevent.killall([reading, writer])
        client.close()
        peer.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_recv_nowait_never_blocks_and_leaves_no_socket_timeout(pki, tls):
    """Nothing buffered: None at once (no wait); once the peer's bytes are in, they come back."""
    client, peer = _pair(pki, tls)
    io = GeventIO(client)
    try:
        started = time.monotonic()
        assert io.recv_nowait() is None
        assert time.monotonic() - started < 0.5
        peer.sendall(b"hello\n")
        deadline = time.monotonic() + 5
        got = b""
        while got != b"hello\n":  # TLS: a session ticket record may come first and decrypt to nothing
            assert time.monotonic() < deadline
            data = io.recv_nowait()
            if data:
                got += data
            else:
                gevent.sleep(0.001)
        assert client.gettimeout() is None
    finally:
        client.close()
        peer.close()


# -- ThreadsIO: SO_RCVTIMEO instead of poll before each read -------------------------------------------

@pytest.fixture
def plain_pair():
    """A connected (client, peer) pair of plain blocking sockets on loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    yield client, peer
    client.close()
    peer.close()


def _rcvtimeo(sock):
    seconds, micros = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    return seconds + micros / 1e6


def off_main(fn):
    """Run ``fn()`` in another thread and return what it returns: the kernel's bound serves the reads of
    every thread but the main one (signals interrupt that one; its reads poll, see ThreadsIO)."""
    thread, out = in_thread(fn)
    thread.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("where", ["other thread", "main thread"])
def test_threads_recv_times_out_at_its_deadline_not_before(plain_pair, where):
    client, _peer = plain_pair
    io = ThreadsIO(client)

    def waits():
        for wait in (0.3, 0.01):  # through the kernel's bound (other thread), and a short one through poll
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                io.recv(started + wait)
            elapsed = time.monotonic() - started
            assert wait <= elapsed < wait + 0.5

    off_main(waits) if where == "other thread" else waits()
    assert (_rcvtimeo(client) > 0) == (where == "other thread")  # the main thread's reads only poll


def test_threads_recv_waits_past_an_early_kernel_bound_for_late_data(plain_pair):
    # The bound is half the remaining time: it ends the first wait early, the read goes on.
    client, peer = plain_pair
    io = ThreadsIO(client)
    timer = threading.Timer(0.35, peer.sendall, (b"late\n",))
    timer.start()
    try:
        assert off_main(lambda: io.recv(time.monotonic() + 5.0)) == b"late\n"
    finally:
        timer.cancel()
    assert 0 < _rcvtimeo(client) < 5.0


def test_threads_recv_keeps_the_kernel_bound_across_calls_with_the_same_timeout(plain_pair):
    client, peer = plain_pair
    io = ThreadsIO(client)

    def reads():
        peer.sendall(b"a\n")
        assert io.recv(time.monotonic() + 10.0) == b"a\n"
        bound = _rcvtimeo(client)
        assert 4.9 < bound <= 5.0  # half of the remaining time, set once
        for _ in range(3):
            peer.sendall(b"b\n")
            assert io.recv(time.monotonic() + 10.0) == b"b\n"
            assert _rcvtimeo(client) == bound  # no setsockopt per call

    off_main(reads)


@pytest.mark.slow
def test_threads_recv_is_not_late_when_little_more_than_the_kernel_bound_remains(plain_pair):
    # A read whose remaining time is just above the bound an earlier call left (1 s, from a 2 s timeout)
    # used that bound as it was; the kernel rounds a timeout up to its timer wheel's granularity (up to
    # 1/8 of it, plus a tick), so the read ended up to ~30 ms past its deadline (7-27 ms measured). Over
    # three reads the lateness averages ~16 ms that way; poll is late by its 1 ms rounding.
    client, peer = plain_pair

    def lateness():
        late = []
        for _ in range(3):
            io = ThreadsIO(client)  # no bound known yet: the first read sets one
            peer.sendall(b"a\n")
            assert io.recv(time.monotonic() + 2.0) == b"a\n"  # leaves the kernel's bound at 1 s
            assert 0.99 < _rcvtimeo(client) <= 1.0
            deadline = time.monotonic() + 1.002
            with pytest.raises(TimeoutError):
                io.recv(deadline)
            late.append(time.monotonic() - deadline)
        return late

    late = off_main(lateness)
    assert min(late) >= 0
    assert sum(late) / len(late) < 0.005, late


class _NoTimeoSocket:
    """A socket whose SO_RCVTIMEO cannot be set, as on a platform without it."""

    def __init__(self, sock):
        self._sock = sock

    def setsockopt(self, *args):
        raise OSError("not supported")

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_threads_recv_polls_where_the_kernel_bound_cannot_be_set(plain_pair):
    client, peer = plain_pair
    io = ThreadsIO(_NoTimeoSocket(client))

    def reads():
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            io.recv(started + 0.2)
        assert 0.2 <= time.monotonic() - started < 0.7
        peer.sendall(b"x\n")
        assert io.recv(time.monotonic() + 5.0) == b"x\n"

    off_main(reads)  # where the bound would otherwise be used
    assert _rcvtimeo(client) == 0  # never set: the poll bounded every read


# -- ThreadsIO under signals: a handler that returns makes Python restart the interrupted recv -----------

@pytest.fixture
def ticking_signals():
    """SIGALRM every 50 ms to this process (the main thread) with a handler that just returns, as a
    program with its own periodic timer has; the timer stops after 4 s at the latest (a watchdog, so a
    read that never ends under it still ends, late, instead of hanging the run)."""
    import signal

    ticks = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: ticks.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    watchdog = threading.Timer(4.0, signal.setitimer, (signal.ITIMER_REAL, 0))
    watchdog.start()
    yield ticks
    watchdog.cancel()
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_threads_recv_keeps_its_deadline_while_signals_keep_interrupting_it(plain_pair, ticking_signals):
    # Python retries a recv interrupted by a signal whose handler returned (PEP 475), and the kernel then
    # starts SO_RCVTIMEO afresh: with a signal every 50 ms a 250 ms kernel bound never ran out, and a
    # 0.5 s read ran until the signals stopped. poll, retried by Python, recomputes its timeout.
    client, _peer = plain_pair
    io = ThreadsIO(client)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        io.recv(started + 0.5)
    elapsed = time.monotonic() - started
    assert len(ticking_signals) >= 5  # the signals did interrupt the wait
    assert 0.5 <= elapsed < 1.5


def test_threads_call_from_the_main_thread_times_out_while_signals_keep_coming(ticking_signals):
    # The same through Client.call: a lone caller in the main thread, where signals are handled, and a
    # server that never answers (a listener nobody accepts from: the kernel completes the connect).
    from geventtcp.client.client import Client
    from geventtcp.errors import CallTimeout

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        with Client(f"127.0.0.1:{silent.getsockname()[1]}", timeout=5, retries=0, mode="threads") as client:
            started = time.monotonic()
            with pytest.raises(CallTimeout):
                client.call(1, {"n": 1}, timeout=0.6)
            elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert len(ticking_signals) >= 5
    assert 0.6 <= elapsed < 1.6


FORK_FROM_A_THREAD = r"""
import os, signal, socket, sys, threading, time
from geventtcp.client.io import ThreadsIO

def in_child():
    # This thread forked: in the child it is the main thread (Python runs signal handlers here).
    signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    threading.Timer(4.0, signal.setitimer, (signal.ITIMER_REAL, 0)).start()
    a, b = socket.socketpair()
    started = time.monotonic()
    try:
        ThreadsIO(a).recv(started + 0.5)
    except TimeoutError:
        pass
    elapsed = time.monotonic() - started
    print(f"{elapsed:.2f}", flush=True)
    os._exit(0 if elapsed < 1.5 else 3)

def forker():
    pid = os.fork()
    if pid == 0:
        in_child()
    _, status = os.waitpid(pid, 0)
    result.append(os.waitstatus_to_exitcode(status))

result = []
thread = threading.Thread(target=forker)
thread.start()
thread.join()
sys.exit(result[0])
"""


@pytest.mark.subprocess
def test_threads_recv_keeps_its_deadline_under_signals_in_a_child_forked_from_a_thread():
    # The thread that forks is the child's main thread, where signals land: its reads must poll too.
    from tests.support.system import run_python

    result = run_python(FORK_FROM_A_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
