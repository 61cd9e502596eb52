"""Servers for tests: ``serve`` (a Server in this process), ``ServerProcess`` (the client app in a
subprocess a test can kill or restart), ``CliServer`` (``geventtcp serve`` or manage.py as a subprocess)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from geventtcp.server.server import Server
from geventtcp.urls import Registry
from tests.support.apps import make_registry
from tests.support.system import ROOT, env

__all__ = ["serve", "addr", "settled", "queued_bytes", "ServerProcess", "CliServer"]


@contextlib.contextmanager
def serve(registry: Registry | None = None, **settings: Any) -> Iterator[Server]:
    """Run a Server (default: ``make_registry()``) on 127.0.0.1 port 0 in this process's hub (its greenlets
    run while the test blocks in gevent); closed (not drained) on exit."""
    settings.setdefault("bind", "127.0.0.1:0")
    server = Server(registry if registry is not None else make_registry(), **settings)
    server.start()
    try:
        yield server
    finally:
        server.close()


def addr(server: Server) -> str:
    """The server's first address as ``host:port`` (what a Client takes)."""
    host, port = server.address[:2]
    return f"{host}:{port}"


def settled(server: Server) -> bool:
    """Nothing armed, nothing in flight: every watch armed was checked and every handoff answered."""
    return (not server.state.watching and server.inflight == 0
            and not any(c.watch_armed or c.inflight or c.running is not None for c in server.connections))


def queued_bytes(server: Server) -> int:
    """Bytes of replies the server holds in its connections' output queues (what RSS would hold)."""
    total = 0
    for conn in list(server.connections):
        for item in conn.out:
            data = item if type(item) is bytes else item.data
            total += len(data or b"")
    return total


class ServerProcess:
    """A one-process server for tests.support.client_app in a subprocess (patched); ``address`` once it listens."""

    def __init__(self, port: int = 0, *args: str, **environ: str) -> None:
        self.port = port
        self.args = args
        self.environ = environ
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self, timeout: float = 20.0) -> None:
        cmd = [sys.executable, "-m", "tests.support.client_app_server", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(**self.environ), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited: {self.proc.wait()}")
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                # Keep draining stderr so the server never blocks on a full pipe.
                threading.Thread(target=_drain, args=(self.proc.stderr,), daemon=True).start()
                return
        raise RuntimeError("server did not start in time")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=40)

    def restart(self) -> None:
        self.kill(signal.SIGTERM)
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


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


