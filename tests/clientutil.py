"""Helpers for the client tests: in-process and subprocess servers, subprocess Python runs."""

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

from geventtcp import Server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(**extra: str) -> dict[str, str]:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = REPO + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(extra)
    return environ


@contextlib.contextmanager
def inprocess_server(**settings: Any) -> Iterator[Server]:
    """A Server for tests.client_app in this process (its greenlets run while the test blocks in gevent)."""
    from tests.client_app import registry

    server = Server(registry, bind="127.0.0.1:0", **settings)
    server.start()
    try:
        yield server
    finally:
        server.close()


def addr(server: Server) -> str:
    host, port = server.address[:2]
    return f"{host}:{port}"


class ServerProcess:
    """A one-process server for tests.client_app in a subprocess (patched); ``address`` once it listens."""

    def __init__(self, port: int = 0, *args: str, **environ: str) -> None:
        self.port = port
        self.args = args
        self.environ = environ
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self, timeout: float = 20.0) -> None:
        cmd = [sys.executable, "-m", "tests.client_server", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(**self.environ), stdout=subprocess.DEVNULL,
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


def run_python(code: str, timeout: float = 60.0, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (so gevent patching cannot leak between tests)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(**environ), capture_output=True,
                          text=True, timeout=timeout)


class FakeServer:
    """A raw listener in this process: each accepted socket goes to ``behaviour(sock, n)`` in a greenlet
    (``n`` counts connections from 0). For replies a real server would never send."""

    def __init__(self, behaviour: Any) -> None:
        import gevent
        from gevent import socket

        self.behaviour = behaviour
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.accepted = 0
        self.lines: list[bytes] = []
        self._loop = gevent.spawn(self._accept)
        self._greenlets: list[Any] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        import gevent

        while True:
            sock, _ = self.listener.accept()
            n = self.accepted
            self.accepted += 1
            self._greenlets.append(gevent.spawn(self._run, sock, n))

    def _run(self, sock: Any, n: int) -> None:
        try:
            self.behaviour(self, sock, n)
        except OSError:
            pass
        finally:
            sock.close()

    def read_line(self, sock: Any, buf: list[bytes]) -> bytes | None:
        """Next request line from ``sock`` (``buf`` holds leftovers between calls); None at EOF."""
        data = b"".join(buf)
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        line, _, rest = data.partition(b"\n")
        buf[:] = [rest]
        self.lines.append(line)
        return line

    def close(self) -> None:
        import gevent

        self._loop.kill()
        gevent.killall(self._greenlets)
        self.listener.close()


class Proxy:
    """A TCP proxy to ``upstream`` with fault knobs: ``delay`` per chunk each way, ``slice`` bytes per
    write, ``rate`` bytes/s. ``close_clients()`` resets every proxied connection."""

    def __init__(self, upstream: str, delay: float = 0.0, slice: int = 0, rate: float = 0.0) -> None:
        import gevent
        from gevent import socket

        self.upstream = upstream
        self.delay, self.slice, self.rate = delay, slice, rate
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.socks: list[Any] = []
        self.greenlets: list[Any] = [gevent.spawn(self._accept)]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        import gevent
        from gevent import socket

        while True:
            client, _ = self.listener.accept()
            if self.rate:  # a small receive buffer, so that a slow forward pushes back on the sender
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            host, port = self.upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            self.socks += [client, server]
            self.greenlets += [gevent.spawn(self._pump, client, server), gevent.spawn(self._pump, server, client)]

    def _forward(self, dst: Any, chunk: bytes) -> None:
        import gevent

        step = self.slice or len(chunk)
        for i in range(0, len(chunk), step):
            dst.sendall(chunk[i:i + step])
            if self.rate:
                gevent.sleep(step / self.rate)

    def _pump(self, src: Any, dst: Any) -> None:
        import gevent
        from gevent.queue import Queue

        if not self.delay:  # inline: nothing is read before the last chunk went out (backpressure)
            try:
                while chunk := src.recv(65536):
                    self._forward(dst, chunk)
                dst.shutdown(2)
            except OSError:
                pass
            return

        queue: Queue = Queue()

        def writer() -> None:
            for due, chunk in queue:
                gevent.sleep(max(0.0, due - time.monotonic()))
                if chunk is None:
                    dst.shutdown(2)
                    return
                self._forward(dst, chunk)

        w = gevent.spawn(writer)
        self.greenlets.append(w)
        try:
            while True:
                chunk = src.recv(65536)
                queue.put((time.monotonic() + self.delay, chunk or None))
                if not chunk:
                    break
        except OSError:
            queue.put((0.0, None))

    def close_clients(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        import gevent

        gevent.killall(self.greenlets)
        self.close_clients()
        self.listener.close()


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn(*args)`` in a new OS thread; the dict gets ``value`` or ``error``, and ``elapsed``."""
    out: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # handed to the test
            out["error"] = exc
        out["elapsed"] = time.monotonic() - started

    t = threading.Thread(target=run)
    t.start()
    return t, out
