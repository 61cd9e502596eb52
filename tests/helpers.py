"""Test helpers: a raw line connection (gevent sockets), the polling wait, and subprocess servers."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket

__all__ = ["ROOT", "RawConn", "wait_until", "terminate", "CliServer", "python_cmd"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RawConn:
    """A byte-exact client of the wire protocol: write what you like, read reply lines, observe EOF.

    ``address`` is a (host, port) tuple or a unix-socket path; ``source`` binds the local address
    first (another loopback IP). Every read waits at most ``timeout`` seconds (``socket.timeout``).
    """

    def __init__(self, address: Any, source: str | None = None, timeout: float = 5.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
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

    def readline(self, timeout: float | None = None) -> bytes:
        """One line including its newline; what is left (b"" or a partial line) on EOF."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def raw_line(self, timeout: float | None = None) -> bytes:
        """The next line without its newline; ``EOFError`` if the server closed first."""
        line = self.readline(timeout)
        if not line.endswith(b"\n"):
            raise EOFError(f"connection closed; {len(line)} bytes unread")
        return line[:-1]

    def line(self, timeout: float | None = None) -> dict[str, Any]:
        """The next line as a reply object; ``EOFError`` if the server closed first."""
        reply = json.loads(self.raw_line(timeout))
        assert isinstance(reply, dict), reply
        return reply

    def call(self, request: int | dict[str, Any] | bytes, params: Any = None, **fields: Any) -> dict[str, Any]:
        """Send a request (a cmdid with params and fields, an object, or raw bytes); its reply line."""
        if isinstance(request, int):
            self.request(request, params, **fields)
        else:
            self.send(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")
        return self.line()

    def at_eof(self) -> bool:
        """True when the next read finds the connection closed (no further line)."""
        return self.readline() == b""

    def expect_eof(self, timeout: float = 5.0) -> None:
        """Wait until the server closes the connection (lines still unread are kept in ``buf``).

        Returns on EOF or reset; ``socket.timeout`` if the connection is still open after ``timeout``.
        """
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


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` (yielding to gevent) until it is truthy and return that value.

    Fails the test with AssertionError after ``timeout`` seconds. The one polling helper of the suite.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        gevent.sleep(interval)


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` (a launcher stops its workers on TERM) and reap it; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


_LISTENING = re.compile(r"listening on (\S+?)[ ,]")


class CliServer:
    """``python -m geventtcp serve ...`` (or manage.py) as a subprocess; learns its port from the log."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 20.0,
                 cwd: str | os.PathLike[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, text=True,
        )
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        self.address = ""
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            match = _LISTENING.search(line)
            if match:
                self.address = match.group(1)
                break
        if not self.address:
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.output))
        host, _, port = self.address.rpartition(":")
        self.host, self.port = host, int(port)

    def rest_of_output(self, timeout: float = 10.0) -> str:
        """Wait for exit (killing after ``timeout``) and return everything the process printed."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return "".join(self.output) + (out or "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]
