"""Shared helpers of the reliability tests: an in-process server, a raw-socket client, test handlers."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
from gevent import socket

from geventtcp.errors import HandlerError
from geventtcp.server import Server
from geventtcp.urls import Registry

__all__ = ["RawConn", "serve", "make_registry", "rss_kib", "open_fds", "wait_until"]


def make_registry() -> Registry:
    """Handlers the hostile-input and limit tests need (cmdids mirror the example app where they overlap)."""
    reg = Registry()

    def echo(req: Any) -> Any:
        return req.params

    def sleep(req: Any) -> Any:
        gevent.sleep(float(req.params.get("seconds", 0)))
        return {"slept": req.params.get("seconds", 0)}

    def fail(req: Any) -> Any:
        raise RuntimeError("secret internal detail \x1b[31m")

    def bad_result(req: Any) -> Any:
        kind = req.params.get("kind")
        if kind == "bigint":
            return 10**5000
        if kind == "nan":
            return float("nan")
        if kind == "set":
            return {1, 2}
        if kind == "circular":
            loop: list[Any] = []
            loop.append(loop)
            return loop
        if kind == "big":
            return "x" * int(req.params.get("size", 0))
        raise HandlerError("unknown kind")

    def spin(req: Any) -> Any:
        # Blocks cooperatively forever (until the deadline throws into it).
        while True:
            gevent.sleep(0.01)

    reg.add(1, echo, idempotent=True)
    reg.add(2, sleep, idempotent=True)
    reg.add(3, fail)
    reg.add(20, bad_result)
    reg.add(21, spin)
    return reg


@contextlib.contextmanager
def serve(registry: Registry | None = None, **settings: Any) -> Iterator[Server]:
    """Run a Server on 127.0.0.1 port 0 in this process's hub; closed (not drained) on exit."""
    settings.setdefault("bind", "127.0.0.1:0")
    server = Server(registry if registry is not None else make_registry(), **settings)
    server.start()
    try:
        yield server
    finally:
        server.close()


class RawConn:
    """A byte-exact client: write what you like, read reply lines as dicts, assert EOF."""

    def __init__(self, address: Any, source: str | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b""
        self.timeout = timeout

    @classmethod
    def tls(cls, address: Any, ctx: Any, hostname: str = "localhost", timeout: float = 5.0) -> RawConn:
        """Connect and finish a TLS handshake (raises ssl.SSLError/OSError when it fails)."""
        from geventtcp.tls import handshake

        conn = cls(address, timeout=timeout)
        conn.sock = handshake(ctx, conn.sock, timeout, server_side=False, server_hostname=hostname)
        conn.sock.settimeout(timeout)
        return conn

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, cmdid: int, params: Any = None, **fields: Any) -> None:
        body = {"cmdid": cmdid, "params": params or {}, **fields}
        self.send(json.dumps(body).encode() + b"\n")

    def raw_line(self, timeout: float | None = None) -> bytes:
        """The next line without its newline; ``EOFError`` if the server closed first."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; {len(self.buf)} bytes unread")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def line(self, timeout: float | None = None) -> dict[str, Any]:
        reply = json.loads(self.raw_line(timeout))
        assert isinstance(reply, dict)
        return reply

    def call(self, cmdid: int, params: Any = None, **fields: Any) -> dict[str, Any]:
        self.request(cmdid, params, **fields)
        return self.line()

    def expect_eof(self, timeout: float = 5.0) -> None:
        """Assert the server closes the connection (after any lines still unread) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return
            if not chunk:
                return
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it is truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        gevent.sleep(interval)


def rss_kib(pid: int | None = None) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid or os.getpid()}/status") as fh:
        for row in fh:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int | None = None) -> int:
    """Number of open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
