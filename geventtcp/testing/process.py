"""An application served by ``geventtcp serve`` in a subprocess, for tests: :class:`AppServer`.

The subprocess is the deployed setup (the launcher's master, ``workers`` monkey-patched worker
processes): ``python -m geventtcp serve APP --bind 127.0.0.1:0 --workers N --bind-file PATH``.
:meth:`AppServer.start` returns once the master wrote the bind file, that is once every worker
imported the application and serves, so the first call is answered at once; ``addresses`` are read
from that file (no log scraping) and ``client`` is a :class:`~geventtcp.client.Client` to the first.

How it fails: a server that exits before it serves, or does not serve within ``start_timeout``,
raises :class:`ServerFailed` with the tail of its log (and is killed). :meth:`AppServer.stop` sends
TERM, waits for the graceful stop and raises :class:`ServerFailed` when the master exited early or
with a nonzero status, or a worker crashed meanwhile (the master logs ``Worker (pid:N) was killed
by ...``/``exited with code N``/``failed to boot`` and replaces it, so a test could pass without it).

Who closes what: the AppServer owns the process, its client and a temporary directory (bind file
and log); :meth:`stop` (or leaving ``with``) releases all of them, even when it raises, keeping the
log's text for :meth:`AppServer.output` (a test of shutdown behaviour reads it after ``stop``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

from geventtcp.client.client import Client

__all__ = ["AppServer", "ServerFailed"]

#: What the master logs when a worker died on its own (the server would go on with a replacement).
WORKER_CRASH = re.compile(r"Worker \(pid:\d+\) (?:was killed by \w+|exited with code [1-9]\d*|failed to boot)")
#: Log bytes quoted in a ServerFailed.
LOG_TAIL = 4000


class ServerFailed(AssertionError):
    """The server subprocess did not start, exited early or with an error, or a worker crashed.

    An AssertionError, so pytest reports it as a failure with its message (which ends with the
    server's log tail).
    """


class AppServer:
    """``geventtcp serve APP`` on 127.0.0.1 port 0 in a subprocess; ``start()``, then ``client``/``addresses``.

    ``workers``: worker processes; ``args``: more command-line options (``["--handler-timeout",
    "2"]``); ``env``: variables added to this process's environment; ``cwd``: the directory the
    server runs in (the workers import the app from there; default: this process's); ``python``:
    the interpreter (default: this one). ``client_options`` go to the Client.
    """

    def __init__(self, app: str, *, workers: int = 1, args: Iterable[str] = (), env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, python: str = sys.executable,
                 start_timeout: float = 30.0, stop_timeout: float = 60.0,
                 client_options: Mapping[str, Any] | None = None) -> None:
        self.app = app
        self.workers = workers
        self.args = list(args)
        self.env = dict(env or {})
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.python = python
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.client_options = dict(client_options or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.addresses: list[str] = []
        self._client: Client | None = None
        self._dir = ""
        self._final_output: str | None = None  # the log as it was when the temporary directory went

    def __repr__(self) -> str:
        return f"<AppServer {self.app} {','.join(self.addresses) or 'not started'}>"

    def __enter__(self) -> AppServer:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The first bound address (``HOST:PORT``)."""
        if not self.addresses:
            raise RuntimeError("the server is not started")
        return self.addresses[0]

    @property
    def client(self) -> Client:
        """A Client to :attr:`address` (made on first use, closed by :meth:`stop`)."""
        if self._client is None:
            self._client = Client(self.address, **self.client_options)
        return self._client

    @property
    def pid(self) -> int:
        """The master's pid."""
        if self.proc is None:
            raise RuntimeError("the server is not started")
        return self.proc.pid

    @property
    def log_path(self) -> str:
        return os.path.join(self._dir, "server.log")

    def output(self) -> str:
        """Everything the server wrote (stdout and stderr) so far; after :meth:`stop`, all it wrote
        (what it logged while stopping included: ``worker_exit`` hooks, the drain)."""
        if self._final_output is not None and not self._dir:
            return self._final_output
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def start(self) -> None:
        """Start the server and wait until every worker serves; :class:`ServerFailed` if it does not."""
        self._dir = tempfile.mkdtemp(prefix="geventtcp-test-")
        self._final_output = None
        bind_file = os.path.join(self._dir, "addresses")
        argv = [self.python, "-m", "geventtcp", "serve", self.app, "--bind", "127.0.0.1:0",
                "--workers", str(self.workers), "--bind-file", bind_file, *self.args]
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a chatty server never blocks on it
            self.proc = subprocess.Popen(argv, cwd=self.cwd, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            self.addresses = self._wait_bound(bind_file)
        except BaseException:
            self._kill()
            self._cleanup()
            raise

    def _wait_bound(self, bind_file: str) -> list[str]:
        """The lines of ``bind_file`` once the master renamed it into place (it is never half written)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(bind_file):
            status = self.proc.poll()
            if status is not None:
                raise ServerFailed(f"{self._describe()} exited with status {status} before serving{self._tail()}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self._describe()} did not serve within {self.start_timeout:g}s{self._tail()}")
            time.sleep(0.02)  # a subprocess offers nothing to wait on but its exit: poll the file
        with open(bind_file, encoding="utf-8") as fh:
            return fh.read().split()

    def stop(self) -> int:
        """TERM, wait for the graceful stop; the exit status. :class:`ServerFailed` if the master
        exited before this, with a nonzero status, or a worker crashed while it ran."""
        if self.proc is None:
            return 0
        if self._client is not None:
            self._client.close()
            self._client = None
        proc = self.proc
        try:
            early = proc.poll()
            if early is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise ServerFailed(f"{self._describe()} did not stop within {self.stop_timeout:g}s of TERM"
                                       f"{self._tail()}") from None
            status = proc.returncode
            if early is not None:
                raise ServerFailed(f"{self._describe()} exited with status {early} while the test ran{self._tail()}")
            if status:
                raise ServerFailed(f"{self._describe()} exited with status {status} on TERM{self._tail()}")
            crash = WORKER_CRASH.search(self.output())
            if crash is not None:
                raise ServerFailed(f"{self._describe()}: {crash.group(0)} while the test ran{self._tail()}")
            return status
        finally:
            self.proc = None
            self._cleanup()

    def _kill(self) -> None:
        """Stop the master at once (QUIT: its workers close too) and reap it; KILL if it lingers."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _cleanup(self) -> None:
        if self._dir:
            self._final_output = self.output()  # kept for output() once the log file is gone
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def _describe(self) -> str:
        return f"geventtcp serve {self.app} (pid {self.proc.pid if self.proc else '?'})"

    def _tail(self) -> str:
        text = self.output()
        return f"; its log:\n{text[-LOG_TAIL:]}" if text else "; it logged nothing"
