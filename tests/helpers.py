"""Test helpers: a raw line connection (gevent sockets), polling waits, and subprocess servers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RawConn:
    """A client socket that writes raw bytes and reads reply lines; for protocol-level tests."""

    def __init__(self, address: Any, timeout: float = 5.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        """One line including its newline; b"" on EOF (socket.timeout if nothing comes)."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> dict[str, Any]:
        line = self.readline()
        assert line.endswith(b"\n"), f"expected a reply line, got {line!r}"
        result: dict[str, Any] = json.loads(line)
        return result

    def call(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        self.send(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")
        return self.reply()

    def at_eof(self) -> bool:
        return self.readline() == b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` (yielding to gevent) until it is truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        gevent.sleep(interval)


_LISTENING = re.compile(r"listening on (\S+?)[ ,]")


class CliServer:
    """``python -m geventtcp serve ...`` (or manage.py) as a subprocess; learns its port from the log."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
