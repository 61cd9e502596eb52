"""TLS on the server (standard ssl via gevent), client verification, mutual TLS, bounded handshakes."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest
from gevent import socket

from geventtcp.errors import ConfigError
from geventtcp.server.proxyproto import build_v2
from geventtcp.server.server import Server
from geventtcp.tls import client_context, server_context
from tests.support.apps import make_registry
from tests.support.certs import Pki, make_pki
from tests.support.rawconn import RawConn
from tests.support.servers import serve
from tests.support.system import wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def test_tls_round_trip_with_verified_server(pki: Pki) -> None:
    with serve(certfile=pki.server_cert, keyfile=pki.server_key) as server:
        with RawConn.tls(server.address, client_context(ca_certs=pki.ca)) as conn:
            assert conn.call(1, {"over": "tls"}, id=1) == {"code": 0, "cmdid": 1, "id": 1, "data": {"over": "tls"}}
            conn.send(b'{"cmdid":1,"id":2,"params":{"n":1}}\n{"cmdid":1,"id":3}\n')
            assert [conn.line()["id"], conn.line()["id"]] == [2, 3]


def test_client_verifies_by_default(pki: Pki) -> None:
    """Default client context (system CAs) rejects our private CA; a wrong hostname is rejected too."""
    with serve(certfile=pki.server_cert, keyfile=pki.server_key) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            RawConn.tls(server.address, client_context())
        with pytest.raises(ssl.SSLCertVerificationError):
            RawConn.tls(server.address, client_context(ca_certs=pki.ca), hostname="db.example.org")
        wait_until(lambda: server.stats.tls_failures >= 2)
        assert server.connections == set()


def test_plaintext_client_on_tls_port_is_closed(pki: Pki) -> None:
    with serve(certfile=pki.server_cert, keyfile=pki.server_key) as server, RawConn(server.address) as conn:
        conn.send(b'{"cmdid":1,"id":1}\n')
        conn.expect_eof(timeout=3)
        assert b'"code"' not in conn.buf  # no JSON reply leaks out in plaintext
        wait_until(lambda: server.stats.tls_failures == 1)


def test_silent_peer_cannot_hold_the_handshake(pki: Pki) -> None:
    with serve(certfile=pki.server_cert, keyfile=pki.server_key, tls_handshake_timeout=0.3) as server:
        with RawConn(server.address) as conn:
            started = time.monotonic()
            conn.expect_eof(timeout=3)
            assert 0.25 < time.monotonic() - started < 2.0
        assert server.stats.tls_failures == 1
        with RawConn.tls(server.address, client_context(ca_certs=pki.ca)) as conn:  # still serving
            assert conn.call(-1)["data"]["pong"] is True


def test_mutual_tls(pki: Pki) -> None:
    settings: dict[str, Any] = dict(certfile=pki.server_cert, keyfile=pki.server_key, ca_certs=pki.ca,
                                    tls_require_client_cert=True)
    with serve(**settings) as server:
        good = client_context(ca_certs=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
        with RawConn.tls(server.address, good) as conn:
            assert conn.call(1, {"a": 1}, id=1)["code"] == 0
        for ctx in (client_context(ca_certs=pki.ca),
                    client_context(ca_certs=pki.ca, certfile=pki.rogue_client_cert, keyfile=pki.rogue_client_key)):
            # TLS 1.3: the client learns of the rejection on its first read, not in the handshake.
            try:
                conn = RawConn.tls(server.address, ctx)
            except (ssl.SSLError, OSError):
                continue
            with conn:
                try:
                    conn.send(b'{"cmdid":1,"id":1}\n')
                    with pytest.raises((ssl.SSLError, OSError, EOFError)):
                        conn.line()
                except (ssl.SSLError, OSError):
                    pass
        wait_until(lambda: server.stats.tls_failures == 2)


def test_mutual_tls_lifts_protected_mode(pki: Pki) -> None:
    """Requiring client certificates counts as authentication: a wildcard bind is allowed."""
    server = Server(make_registry(), bind="0.0.0.0:0", certfile=pki.server_cert, keyfile=pki.server_key,
                    ca_certs=pki.ca, tls_require_client_cert=True)
    server.start()
    try:
        ctx = client_context(ca_certs=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
        with RawConn.tls(("127.0.0.1", server.address[1]), ctx) as conn:
            assert conn.call(-1)["code"] == 0
    finally:
        server.close()


def test_bad_tls_settings_fail_at_construction(pki: Pki, tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        Server(make_registry(), bind="127.0.0.1:0", certfile="/nonexistent.pem")
    with pytest.raises(ConfigError, match="needs ca_certs"):
        server_context(pki.server_cert, pki.server_key, require_client_cert=True)
    with pytest.raises(ConfigError, match="need certfile"):
        Server(make_registry(), bind="127.0.0.1:0", keyfile=pki.server_key)


def test_handshake_helper_closes_socket_on_failure(pki: Pki) -> None:
    with serve() as server:  # plaintext server: the TLS client hello gets no TLS answer
        from geventtcp.tls import handshake

        sock = socket.create_connection(server.address)
        with pytest.raises((ssl.SSLError, OSError, TimeoutError)):
            handshake(client_context(ca_certs=pki.ca), sock, 0.5, server_side=False, server_hostname="localhost")
        assert sock.fileno() == -1 or sock.closed


def test_silent_handshakes_count_against_the_per_peer_limit(pki: Pki) -> None:
    with serve(certfile=pki.server_cert, keyfile=pki.server_key, max_connections_per_peer=2,
               tls_handshake_timeout=5) as server:
        silent = [RawConn(server.address) for _ in range(2)]
        wait_until(lambda: server.peers.get("127.0.0.1") == 2)
        with RawConn(server.address) as extra:  # refused at once: closed without a line (TLS port)
            extra.expect_eof(timeout=2)
            assert extra.buf == b""
        for conn in silent:
            conn.close()
        wait_until(lambda: not server.peers)  # released when the handshakes fail
        with RawConn.tls(server.address, client_context(ca_certs=pki.ca)) as conn:
            assert conn.call(-1)["code"] == 0


def _bio_exchange(sock: socket.socket, tls: ssl.SSLObject, outgoing: ssl.MemoryBIO, incoming: ssl.MemoryBIO,
                  step: Callable[[], Any]) -> Any:
    """Run ``step`` (a handshake or a read) on a memory-BIO TLS object over ``sock`` until it is done."""
    while True:
        try:
            result = step()
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "server closed the connection"
            incoming.write(data)
            continue
        if outgoing.pending:
            sock.sendall(outgoing.read())
        return result


def test_proxy_header_comes_before_the_tls_handshake(pki: Pki) -> None:
    """HAProxy sends the PROXY header, then relays the client's ClientHello, maybe in one segment:
    the server takes exactly the header and hands the rest to the handshake (cmdid 8 introspects)."""
    with serve(certfile=pki.server_cert, keyfile=pki.server_key, proxy_protocol=True,
               protected_mode=False) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_context(ca_certs=pki.ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            sock.sendall(build_v2(("198.51.100.4", 5555)) + outgoing.read())  # header + ClientHello together
            _bio_exchange(sock, tls, outgoing, incoming, tls.do_handshake)
            tls.write(b'{"cmdid":8,"id":1}\n')
            reply = _bio_exchange(sock, tls, outgoing, incoming, lambda: tls.read(65536))
            assert json.loads(reply)["data"]["address"] == ["198.51.100.4", 5555]
        assert server.stats.tls_failures == 0 and server.stats.proxy_header_failures == 0
