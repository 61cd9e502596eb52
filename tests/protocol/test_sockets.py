"""Listener addresses: parsing bind strings and binding them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from geventtcp.errors import ConfigError
from geventtcp.sockets import create_listener, format_address, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8889", (socket.AF_INET, ("127.0.0.1", 8889))),
        ("localhost", (socket.AF_INET, ("localhost", 8889))),
        (":9000", (socket.AF_INET, ("0.0.0.0", 9000))),
        ("[::1]:7000", (socket.AF_INET6, ("::1", 7000))),
        ("[::1]", (socket.AF_INET6, ("::1", 8889))),
        ("unix:/tmp/a.sock", (socket.AF_UNIX, "/tmp/a.sock")),
    ],
)
def test_parse_address(text: str, expected: tuple[int, object]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["unix:", "[::1", "host:port", "host:70000"])
def test_parse_address_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_tcp_listener_has_nodelay_and_reports_its_port() -> None:
    sock = create_listener("127.0.0.1:0")
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert format_address(sock) == f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_unix_listener_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    first = create_listener(f"unix:{path}")
    first.close()  # leaves the file behind, as a crashed server would
    second = create_listener(f"unix:{path}")
    try:
        assert format_address(second) == f"unix:{path}"
    finally:
        second.close()


def test_bind_error_names_the_address() -> None:
    taken = create_listener("127.0.0.1:0")
    try:
        port = taken.getsockname()[1]
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            create_listener(f"127.0.0.1:{port}")
    finally:
        taken.close()
