"""The launcher as a subprocess (``python -m geventtcp serve APP`` with workers) and STATS-based waits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.rawconn import call_once
from tests.support.system import ROOT, terminate, wait_until

__all__ = ["Launcher", "wait_inflight"]

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
        stats: dict[str, Any] = call_once(self.address, -3)
        return stats

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
