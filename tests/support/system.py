"""The machine the tests run on: the repository root, waiting, subprocess environment, process probes."""

from __future__ import annotations

import os
import socket as stdsocket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import gevent

__all__ = ["ROOT", "wait_until", "terminate", "env", "python_cmd", "run_python", "in_thread", "rss_kib",
           "cpu_seconds", "non_loopback_ip"]

#: The repository root (subprocesses run there, with it on PYTHONPATH).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH (``tests.support`` imports)."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(extra)
    return environ


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def run_python(code: str, timeout: float = 60.0, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (so gevent patching cannot leak between tests)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(**environ), capture_output=True,
                          text=True, timeout=timeout)


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


def rss_kib(pid: int | None = None) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid or os.getpid()}/status") as fh:
        for row in fh:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used: how a test knows a worker is spinning, not idle."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def non_loopback_ip() -> str | None:
    """A local, non-loopback IPv4 address of this host (to connect to 127.0.0.1 *from*), if any."""
    probe = stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        ip = probe.getsockname()[0]
    except OSError:
        ip = None
    finally:
        probe.close()
    return ip if ip and not ip.startswith("127.") else None
