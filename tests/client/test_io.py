"""GeventIO: per-operation deadlines that concurrent greenlets on one socket cannot disturb."""

import socket
import ssl
import time

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl

from geventtcp.client.io import GeventIO
from tests.support.certs import make_pki


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
