"""Helpers of the launcher tests: a test application, a launcher subprocess, and a reconnecting caller."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from .helpers import ROOT, RawConn, terminate, wait_until

__all__ = ["APP_SOURCE", "write_app", "Launcher", "Caller", "call_once", "wait_inflight", "wait_spinning"]

#: The test application: echo, sleep, CPU spin (blocks the hub), and whoami (the serving pid and
#: the module's VERSION, which a test rewrites to prove that HUP re-imports the application).
APP_SOURCE = textwrap.dedent('''
    import os
    import time

    from geventtcp import Registry

    VERSION = {version!r}
    registry = Registry()

    @registry.handler(1, idempotent=True)
    def echo(request):
        """Reply with the params."""
        return request.params

    @registry.handler(2, idempotent=True)
    def sleep(request):
        """Sleep params.seconds (patched time.sleep: cooperative)."""
        time.sleep(request.params.get("seconds", 0))
        return {{"slept": request.params.get("seconds", 0), "pid": os.getpid()}}

    @registry.handler(7)
    def spin(request):
        """Spin the CPU for params.seconds: blocks the event loop. While it spins, the file
        ``spinning-PID`` exists in the working directory, so a test knows the loop is blocked."""
        marker = "spinning-%d" % os.getpid()
        open(marker, "w").close()
        end = time.monotonic() + request.params.get("seconds", 0)
        while time.monotonic() < end:
            pass
        os.unlink(marker)
        return "spun"

    @registry.handler(9, idempotent=True)
    def whoami(request):
        """The serving worker's pid and the application version."""
        return {{"pid": os.getpid(), "version": VERSION}}
''')


def write_app(directory: Path, version: str = "v1", name: str = "opsapp") -> str:
    (directory / f"{name}.py").write_text(APP_SOURCE.format(version=version))
    return name


class Launcher:
    """``python -m geventtcp serve APP ...`` as a subprocess; collects its log lines in a thread."""

    def __init__(self, app_dir: Path, *args: str, app: str = "opsapp", env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        argv = [sys.executable, "-m", "geventtcp", "serve", app, "--bind", "127.0.0.1:0", *args]
        environ = {**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}", **(env or {})}
        self.proc = subprocess.Popen(argv, cwd=str(app_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=environ, text=True)
        self.lines: list[str] = []
        self.log_path = log_path  # with --log-file: follow that file instead of the output
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            match = self.wait_log(r"master (\d+) bound (\S+?)[;,]", timeout=30)
            self.master = int(match.group(1))
            host, _, port = match.group(2).rpartition(":")
            self.address = (host, int(port))
        except BaseException:
            self.proc.kill()  # nothing may outlive a failed start (orphaned workers exit within a heartbeat)
            self.proc.wait()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        if self.log_path is None:
            for line in self.proc.stdout:
                self.lines.append(line)
            return
        offset = 0
        while True:  # follow the log file by name (it may be renamed and recreated)
            exited = self.proc.poll() is not None
            try:
                with open(self.log_path, encoding="utf-8") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                data = ""
            complete = data[: data.rfind("\n") + 1]
            offset += len(complete.encode())
            self.lines.extend(complete.splitlines(keepends=True))
            if exited:
                self.lines.append(self.proc.stdout.read())
                return
            time.sleep(0.02)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> re.Match[str]:
        """The ``count``-th match of ``pattern`` in the log, waiting for it."""
        regex = re.compile(pattern)

        def found() -> Any:
            matches = [m for m in (regex.search(line) for line in list(self.lines)) if m]
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"launcher exited ({self.proc.returncode}) before {pattern!r}:\n{self.output}")
            return None

        try:
            result: re.Match[str] = wait_until(found, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {pattern!r} not logged; log so far:\n{self.output}") from None
        return result

    def signal(self, sig: int) -> None:
        os.kill(self.master, sig)

    def stats(self) -> dict[str, Any]:
        return call_once(self.address, -3)

    def worker_pids(self) -> set[int]:
        return {w["pid"] for w in self.stats()["workers"]}

    def wait_workers(self, n: int, timeout: float = 30.0, exclude: set[int] | None = None) -> set[int]:
        """Wait until STATS reports exactly ``n`` workers (none of ``exclude``); their pids."""
        def ready() -> set[int] | None:
            try:
                pids = self.worker_pids()
            except OSError:
                return None
            return pids if len(pids) == n and not (pids & (exclude or set())) else None

        try:
            pids: set[int] = wait_until(ready, timeout, 0.1)
        except AssertionError:
            raise AssertionError(f"not {n} workers (excluding {exclude}) within {timeout}s; log:\n"
                                 f"{self.output[-4000:]}") from None
        return pids

    def wait_exit(self, timeout: float) -> int:
        """Wait (cooperatively: the test's client greenlets keep running) for the launcher's exit status."""
        try:
            wait_until(lambda: self.proc.poll() is not None, timeout, 0.02)
        except AssertionError:
            raise AssertionError(f"launcher still running after {timeout}s:\n{self.output}") from None
        return self.proc.returncode

    def close(self) -> None:
        """Stop the launcher (TERM, then KILL) and any worker it leaves behind."""
        terminate(self.proc)
        self._reader.join(timeout=5)


def call_once(address: Any, cmdid: int, params: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """One request on a fresh connection; the reply's data (OSError on goaway or EOF, ValueError on error)."""
    with RawConn(address, timeout=timeout) as conn:
        conn.request(cmdid, params, id=1)
        line = conn.readline()
    if not line.endswith(b"\n"):
        raise ConnectionError("closed before a reply")
    reply = json.loads(line)  # a goaway may follow the reply
    if reply.get("goaway"):
        raise ConnectionError(f"goaway {reply['goaway']}")
    if reply["code"]:
        raise ValueError(reply)
    return reply["data"]


def wait_inflight(address: Any, cmdid: int, count: int, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until STATS at ``address`` counts ``count`` requests of ``cmdid`` running; that STATS reply.

    The way to know a request was read and reached its handler before a test signals or kills.
    """
    def reached() -> dict[str, Any] | None:
        try:
            stats: dict[str, Any] = call_once(address, -3)
        except OSError:
            return None
        return stats if stats["commands"].get(str(cmdid), {}).get("inflight", 0) >= count else None

    try:
        result: dict[str, Any] = wait_until(reached, timeout, 0.02)
    except AssertionError:
        raise AssertionError(f"not {count} request(s) of cmdid {cmdid} in flight within {timeout}s") from None
    return result


def wait_spinning(app_dir: Any, pid: int, timeout: float = 20) -> None:
    """Wait until worker ``pid`` is inside the app's spin handler (its event loop is blocked)."""
    marker = os.path.join(str(app_dir), f"spinning-{pid}")
    wait_until(lambda: os.path.exists(marker), timeout)




class Caller:
    """A client with one persistent connection and one request at a time, as a pooled client has.

    ``call`` returns the reply. A goaway (the server read nothing more) makes it reconnect and resend;
    an EOF after sending raises :class:`MaybeExecutedError`; a refused connect is counted in ``refused``,
    a connect reset in ``reset_at_connect`` (both re-raised).
    """

    class MaybeExecutedError(Exception):
        pass

    def __init__(self, address: Any, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self.conn: RawConn | None = None
        self.refused = 0
        self.reset_at_connect = 0
        self.goaways: list[str] = []
        self.resent = 0

    def _connect(self) -> RawConn:
        try:
            self.conn = RawConn(self.address, timeout=self.timeout)
        except ConnectionRefusedError:
            self.refused += 1
            raise
        except ConnectionResetError:  # reset in the handshake (its listener closed): nothing was sent
            self.reset_at_connect += 1
            raise
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, cmdid: int, params: dict[str, Any] | None = None, request_id: int = 0) -> dict[str, Any]:
        line = json.dumps({"cmdid": cmdid, "id": request_id, "params": params or {}}).encode() + b"\n"
        for _attempt in range(20):
            conn = self.conn if self.conn is not None else self._connect()
            try:
                conn.send(line)
                reply_line = conn.readline()
            except ConnectionResetError as exc:
                self.close()
                raise self.MaybeExecutedError(f"connection reset after sending: {exc}") from None
            if not reply_line.endswith(b"\n"):
                self.close()
                raise self.MaybeExecutedError("EOF after sending, without a goaway")
            reply: dict[str, Any] = json.loads(reply_line)
            if reply.get("goaway"):
                self.goaways.append(reply["goaway"])
                self.resent += 1
                self.close()
                continue
            return reply
        raise AssertionError("20 goaways in a row")
