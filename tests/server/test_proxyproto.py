"""The PROXY protocol: the sans-IO parser (v1, v2, every malformed form) and a proxy_protocol server."""

from __future__ import annotations

import json
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket

from geventtcp.errors import ConfigError
from geventtcp.log import make_access_hook
from geventtcp.server import proxyproto
from geventtcp.server.proxyproto import (
    MAX_HEADER_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    is_trusted,
    parse,
    trusted_networks,
)
from geventtcp.server.server import Server
from tests.support.apps import write_app
from tests.support.launcher import Launcher
from tests.support.rawconn import RawConn
from tests.support.system import wait_until

CLIENT4 = ("203.0.113.7", 40001)
CLIENT6 = ("2001:db8::7", 40002, 0, 0)

# -- the parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, source", [
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 8889\r\n", CLIENT4),
    (b"PROXY TCP6 2001:db8::7 ::1 40002 8889\r\n", CLIENT6),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n", None),
    (build_v2(CLIENT4), CLIENT4),
    (build_v2(CLIENT6), CLIENT6),
    (build_v2(CLIENT4, tlvs=b"\x05\x00\x03abc"), CLIENT4),  # a TLV (unique-id) is skipped
    (build_v2(None), None),  # LOCAL: HAProxy's health check
    (V2_SIGNATURE + b"\x21\x00\x00\x00", None),  # PROXY with family UNSPEC
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), None),  # AF_UNIX: the socket's address stands
])
def test_parses_each_form_and_leaves_what_follows(header: bytes, source: Any) -> None:
    data = header + b'{"cmdid":-1}\n'
    parsed = parse(data)
    assert parsed is not None and parsed.length == len(header) and parsed.source == source
    assert parsed.version == (1 if header.startswith(b"PROXY") else 2)
    for cut in range(len(header)):  # every prefix: "need more", never an error or a wrong answer
        assert parse(header[:cut]) is None


def test_v2_destination_is_parsed() -> None:
    parsed = parse(build_v2(CLIENT4, ("10.0.0.1", 9001)))
    assert parsed == ProxyHeader(2, 28, CLIENT4, ("10.0.0.1", 9001))


@pytest.mark.parametrize("data, error", [
    (b'{"cmdid":-1}\n', "no PROXY header"),  # a plain client on a proxy listener
    (b"GET / HTTP/1.1\r\n", "no PROXY header"),
    (b"PROXX", "no PROXY header"),
    (b"\r\n\r\n\x00\r\nQUIX", "bad PROXY v2 signature"),
    (b"\r\x00", "bad PROXY v2 signature"),
    (b"PROXY TCP4 " + b"1" * 100, "not ended by CRLF within 107"),  # oversize v1 line
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\n", "not ended by CRLF"),  # bare LF
    (b"PROXY TCP5 203.0.113.7 127.0.0.1 1 2\r\n", "must be"),
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 1\r\n", "must be"),
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2 3\r\n", "must be"),
    (b"PROXY TCP4 2001:db8::7 127.0.0.1 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 203.0.113.7 ::1 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 203.0.113 127.0.0.1 1 2\r\n", "bad address"),
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 65536 2\r\n", "bad port"),
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 +1 2\r\n", "bad port"),
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 01 2\r\n", "bad port"),
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 \xd9\xa1 2\r\n", "not ASCII"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "unsupported version 1"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "unknown address family"),  # family 4
    (V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "unknown address family"),  # transport 3
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "not a stream"),  # DGRAM
    (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "needs 12"),  # too short for IPv4 addresses
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "needs 36"),
    (V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 60000), "over the"),  # oversize: refused up front
])
def test_malformed_headers_are_errors(data: bytes, error: str) -> None:
    with pytest.raises(ProxyHeaderError, match=error):
        parse(data)


def test_truncated_headers_need_more() -> None:
    assert parse(b"") is None and parse(b"PRO") is None and parse(b"\r\n\r\n") is None
    assert parse(build_v2(CLIENT6)[:-1]) is None and parse(b"PROXY TCP4 203.0.113.7 ") is None
    # A v2 header at the size limit is still accepted once whole.
    big = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0, MAX_HEADER_BYTES - 16) + bytes(MAX_HEADER_BYTES - 16)
    assert parse(big[:-1]) is None and parse(big) == ProxyHeader(2, MAX_HEADER_BYTES)


def test_trust_list() -> None:
    nets = trusted_networks(["127.0.0.1", "::1", "10.0.0.0/8"])
    assert is_trusted(("127.0.0.1", 5), nets) and is_trusted(("10.9.8.7", 5), nets)
    assert is_trusted(("::1", 5, 0, 0), nets) and is_trusted(("::ffff:10.0.0.1", 5, 0, 0), nets)
    assert is_trusted("/run/app.sock", nets)  # a unix-socket peer: a local process
    assert not is_trusted(("127.0.0.2", 5), nets) and not is_trusted(("192.168.1.1", 5), nets)
    assert trusted_networks(["*"]) is None and is_trusted(("192.168.1.1", 5), None)


def test_trust_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="proxy_allow_from"):
        Server(proxy_allow_from="10.0.0.0/8,not-an-ip")
    assert Server(proxy_allow_from="10.0.0.0/8, 127.0.0.1").settings.proxy_allow_from == ["10.0.0.0/8", "127.0.0.1"]
    assert Server().settings.proxy_allow_from == ["127.0.0.1", "::1"]
    assert not Server().settings.proxy_protocol  # off unless asked for


# -- a server with proxy_protocol on -----------------------------------------------------------------

INTROSPECT = 8  # conftest's handler returning req.address


def _closed_without_reply(conn: RawConn) -> bool:
    conn.expect_eof()
    return conn.buf == b""


@pytest.mark.parametrize("build", [build_v1, build_v2])
def test_the_server_sees_the_client_address_of_the_header(serve: Callable[..., Server],
                                                          build: Callable[..., bytes]) -> None:
    server = serve(proxy_protocol=True, protected_mode=False)
    for client in (CLIENT4, CLIENT6):
        with RawConn(server.address) as conn:
            # Header and first request in one segment: the request is not lost.
            conn.send(build(client) + b'{"cmdid":8,"id":1}\n{"cmdid":8,"id":2}\n')
            assert conn.line()["data"]["address"] == list(client)
            assert conn.line()["id"] == 2
            assert conn.call(1, {"after": "header"})["data"] == {"after": "header"}
    assert server.stats.proxy_header_failures == 0


def test_a_header_split_over_segments_is_read_whole(serve: Callable[..., Server]) -> None:
    server = serve(proxy_protocol=True, protected_mode=False)
    for header, client in ((build_v1(CLIENT4), CLIENT4), (build_v2(CLIENT6), CLIENT6)):
        with RawConn(server.address) as conn:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(header)):
                conn.send(header[i:i + 1])
                gevent.sleep(0.001)  # pacing, not waiting: the server peeks between the pieces
            conn.send(b'{"cmdid":8}\n')
            assert conn.line()["data"]["address"] == list(client)


def test_local_command_keeps_the_socket_address(serve: Callable[..., Server]) -> None:
    server = serve(proxy_protocol=True)
    for header in (build_v2(None), build_v1(None)):  # HAProxy's check-send-proxy health check, UNKNOWN
        with RawConn(server.address) as conn:
            conn.send(header + b'{"cmdid":-1}\n')
            assert conn.line()["data"]["draining"] is False
            assert conn.call(INTROSPECT)["data"]["address"][0] == "127.0.0.1"


@pytest.mark.parametrize("data", [
    b'{"cmdid":1,"params":{"ran":true}}\n',  # a plain client: never served as one on a proxy listener
    b"PROXY TCP4 203.0.113.7 127.0.0.1 40001\r\n" + b'{"cmdid":1}\n',
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12) + b'{"cmdid":1}\n',
    b"PROXY TCP4 " + b"9" * 200,
])
def test_a_bad_or_missing_header_closes_the_connection(serve: Callable[..., Server], data: bytes) -> None:
    server = serve(proxy_protocol=True)
    with RawConn(server.address) as conn:
        conn.send(data)
        assert _closed_without_reply(conn)
    assert server.stats.proxy_header_failures == 1 and not server.connections
    assert 1 not in server.stats.commands  # the request after the bad header never ran


def test_an_untrusted_peer_is_closed(serve: Callable[..., Server]) -> None:
    server = serve(proxy_protocol=True, proxy_allow_from="10.0.0.0/8", protected_mode=False)
    with RawConn(server.address) as conn:
        conn.send(build_v2(("127.0.0.1", 1)) + b'{"cmdid":-1}\n')  # a valid header, from 127.0.0.1
        assert _closed_without_reply(conn)
    assert server.stats.proxy_header_failures == 1
    server2 = serve(proxy_protocol=True, proxy_allow_from="127.0.0.2", protected_mode=False)
    with RawConn(server2.address, source="127.0.0.2") as conn:
        conn.send(build_v2(CLIENT4) + b'{"cmdid":8}\n')
        assert conn.line()["data"]["address"] == list(CLIENT4)


def test_a_silent_peer_is_closed_after_the_header_timeout(serve: Callable[..., Server]) -> None:
    server = serve(proxy_protocol=True, proxy_protocol_timeout=0.3)
    with RawConn(server.address) as conn:
        started = time.monotonic()
        conn.send(b"PROXY TCP4 ")  # half a header, then nothing
        assert _closed_without_reply(conn)
        assert 0.25 < time.monotonic() - started < 3
    assert server.stats.proxy_header_failures == 1


def test_limits_and_protected_mode_see_the_real_client(serve: Callable[..., Server]) -> None:
    server = serve(proxy_protocol=True, max_connections_per_peer=2)
    conns = [RawConn(server.address) for _ in range(4)]
    try:
        codes = []
        for conn, client in zip(conns, [("127.0.0.7", 1), ("127.0.0.7", 2), ("127.0.0.8", 3), ("127.0.0.7", 4)],
                                strict=True):
            conn.send(build_v2(client) + b'{"cmdid":-1}\n')
            codes.append(conn.line()["code"])
        assert codes == [0, 0, 0, 503]  # per real client, not per proxy (all come from 127.0.0.1)
        assert server.peers == {"127.0.0.7": 2, "127.0.0.8": 1}
        with RawConn(server.address) as outsider:  # protected mode: the client is not loopback
            outsider.send(build_v1(CLIENT4) + b'{"cmdid":-1}\n')
            reply = outsider.line()
            assert reply["code"] == 403 and "protected mode" in reply["msg"]
    finally:
        for conn in conns:
            conn.close()
    wait_until(lambda: not server.peers)


def test_the_access_log_names_the_real_client(serve: Callable[..., Server],
                                              caplog: pytest.LogCaptureFixture) -> None:
    server = serve(proxy_protocol=True, protected_mode=False)
    server.access_log = make_access_hook()
    caplog.set_level("INFO", logger="geventtcp.access")
    with RawConn(server.address) as conn:
        conn.send(build_v1(CLIENT4) + b'{"cmdid":1,"id":5}\n')
        assert conn.line()["id"] == 5
    assert any(r.getMessage().startswith("203.0.113.7:40001 cmdid=1 id=5") for r in caplog.records)


def test_without_the_setting_a_header_is_just_a_bad_line(serve: Callable[..., Server]) -> None:
    server = serve()
    with RawConn(server.address) as conn:
        conn.send(build_v1(("127.0.0.9", 1)) + b'{"cmdid":8}\n')
        assert conn.line()["code"] == 400
        assert conn.line()["data"]["address"][0] == "127.0.0.1"
    assert server.stats.proxy_header_failures == 0


def test_build_helpers_round_trip() -> None:
    assert proxyproto.parse(build_v1(CLIENT4, ("127.0.0.1", 8889))) == ProxyHeader(
        1, len(build_v1(CLIENT4, ("127.0.0.1", 8889))), CLIENT4, ("127.0.0.1", 8889))


def _accepted(server_port: int, client_port: int) -> bool:
    """Has some process accept()ed this loopback TCP connection? (/proc/net/tcp gives it an inode then)"""
    with open("/proc/net/tcp", encoding="ascii") as fh:
        for row in fh.readlines()[1:]:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                return inode != "0"
    return False


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_connection_waiting_for_its_header_when_the_worker_drains_gets_a_goaway(tmp_path: Path) -> None:
    # A proxied connection the worker accepted just before a drain, whose header is still on its
    # way, is a connection like any other: it gets a goaway (not processed: resend), not a close.
    write_app(tmp_path)
    launcher = Launcher(tmp_path, "--workers", "1", "--proxy-protocol")
    try:
        with RawConn(launcher.address) as conn:
            header = build_v1(CLIENT4)
            conn.send(header[:6])
            port = conn.sock.getsockname()[1]
            wait_until(lambda: _accepted(launcher.address[1], port))  # the worker waits for the rest
            launcher.signal(signal.SIGTERM)
            launcher.wait_log("worker draining")
            conn.send(header[6:] + b'{"cmdid":1,"id":1}\n')
            line = conn.readline()
            assert line.endswith(b"\n") and json.loads(line)["goaway"] == "shutdown", line
        assert launcher.wait_exit(15) == 0
    finally:
        launcher.close()


def test_connections_waiting_for_their_header_count_against_max_connections(serve: Callable[..., Server]) -> None:
    # A silent connection from a trusted peer holds a descriptor until proxy_protocol_timeout; those
    # waits must not take the worker past max_connections (one over gets its 503 line at once).
    server = serve(proxy_protocol=True, max_connections=2, proxy_protocol_timeout=60, protected_mode=False)
    waiting = [RawConn(server.address) for _ in range(2)]
    try:
        for conn in waiting:
            conn.send(b"PROXY ")
        with RawConn(server.address) as over:
            reply = over.line(timeout=5)
            assert reply["code"] == 503 and "max number of connections" in reply["msg"]
            over.expect_eof()
        assert server.stats.connections_rejected == 1
        for conn, client in zip(waiting, (CLIENT4, ("203.0.113.8", 2)), strict=True):  # the two are served
            conn.send(build_v1(client)[6:] + b'{"cmdid":8}\n')
            assert conn.line()["data"]["address"] == list(client)
    finally:
        for conn in waiting:
            conn.close()
