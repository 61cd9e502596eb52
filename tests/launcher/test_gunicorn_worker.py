"""``gunicorn -k geventtcp.gunicorn_worker.GeventTCPWorker APP`` against real gunicorn, in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import gevent
import pytest
from gunicorn.config import KNOWN_SETTINGS

from tests.support.apps import write_app
from tests.support.rawconn import Caller, call_once
from tests.support.system import ROOT, terminate, wait_until

pytestmark = pytest.mark.subprocess


class Gunicorn:
    def __init__(self, app_dir: Path, *args: str) -> None:
        argv = [sys.executable, "-m", "gunicorn", "-k", "geventtcp.gunicorn_worker.GeventTCPWorker",
                "-b", "127.0.0.1:0", *args, "opsapp"]
        if any(s.name == "control_socket" for s in KNOWN_SETTINGS):  # gunicorn >= 25.1
            argv[3:3] = ["--control-socket", str(app_dir / "gunicorn.ctl")]
        self.proc = subprocess.Popen(argv, cwd=str(app_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),  # type: ignore
                         daemon=True).start()
        try:
            line = wait_until(lambda: next((x for x in list(self.lines) if "geventtcp serving" in x), None), 20)
            host, _, port = line.split("geventtcp serving ")[1].split()[0].rpartition(":")
            self.address = (host, int(port))
        except BaseException:
            self.close()
            raise

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        """TERM (gunicorn stops its workers), KILL if that takes too long."""
        terminate(self.proc)


@pytest.mark.slow
def test_gunicorn_serves_the_protocol_and_drains_on_term(tmp_path: Path) -> None:
    write_app(tmp_path)
    server = Gunicorn(tmp_path, "-w", "2", "--graceful-timeout", "5")
    try:
        assert call_once(server.address, 1, {"via": "gunicorn"}) == {"via": "gunicorn"}
        wait_until(lambda: server.output.count("geventtcp serving") == 2, 20)
        caller = Caller(server.address)
        slow = gevent.spawn(caller.call, 2, {"seconds": 2}, 1)
        # Signal once a worker reports the request running (STATS here is per worker: poll until the
        # one running it answers; its ``inflight`` counts requests handed off to their own greenlet).
        wait_until(lambda: call_once(server.address, -3)["inflight"] >= 1, 30)
        server.proc.send_signal(signal.SIGTERM)
        reply = slow.get(timeout=15)
        assert reply["code"] == 0 and reply["data"]["slept"] == 2  # in flight: answered
        assert caller.conn is not None
        assert b'"goaway":"shutdown"' in caller.conn.raw_line(timeout=5)  # then told to go elsewhere
        wait_until(lambda: server.proc.poll() is not None, 10)
        assert server.proc.returncode == 0
    finally:
        server.close()


@pytest.mark.slow
def test_gunicorn_max_requests_restarts_the_worker_with_a_goaway(tmp_path: Path) -> None:
    write_app(tmp_path)
    server = Gunicorn(tmp_path, "-w", "1", "--max-requests", "10")
    try:
        caller = Caller(server.address)
        pids = [caller.call(9, request_id=i)["data"]["pid"] for i in range(25)]
        assert len(set(pids)) >= 2 and pids[:10] == [pids[0]] * 10 and pids[10] != pids[0]
        assert "goaway" not in str(pids) and caller.goaways and set(caller.goaways) == {"max_requests"}
        caller.close()
    finally:
        server.close()


@pytest.mark.slow
def test_a_broken_app_is_a_gunicorn_boot_error(tmp_path: Path) -> None:
    (tmp_path / "opsapp.py").write_text("raise ImportError('no handlers today')\n")
    argv = [sys.executable, "-m", "gunicorn", "-k", "geventtcp.gunicorn_worker.GeventTCPWorker",
            "-b", "127.0.0.1:0", "opsapp"]
    if any(s.name == "control_socket" for s in KNOWN_SETTINGS):
        argv[3:3] = ["--control-socket", str(tmp_path / "gunicorn.ctl")]
    out = subprocess.run(argv, cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert out.returncode != 0 and "no handlers today" in out.stderr
