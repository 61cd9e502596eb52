"""Running out of file descriptors (case 25): existing connections keep working, no busy loop, accept resumes."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time

import pytest

from tests.support.rawconn import RawConn
from tests.support.system import ROOT, cpu_seconds, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

FD_LIMIT = 40


def test_fd_exhaustion(tmp_path: object) -> None:
    log_path = os.path.join(str(tmp_path), "server.log")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "geventtcp", "serve", "handlers", "-b", "127.0.0.1:0"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=limit)
    served: list[RawConn] = []
    pending: list[RawConn] = []
    try:
        match = wait_until(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", open(log_path).read()), 20)
        address = ("127.0.0.1", int(match.group(1)))
        for _ in range(FD_LIMIT + 10):  # more than the server can hold
            conn = RawConn(address, timeout=0.5)
            conn.send(b'{"cmdid":-1}\n')
            try:
                assert conn.line()["code"] == 0
            except TimeoutError:
                pending.append(conn)
                break
            served.append(conn)
        assert pending, "the server never ran out of descriptors"
        for _ in range(3):
            conn = RawConn(address, timeout=0.5)
            conn.send(b'{"cmdid":-1}\n')
            pending.append(conn)
        assert 10 < len(served) < FD_LIMIT
        cpu_before, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)  # the server sits out of descriptors with 4 connections waiting in the backlog
        busy = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - t0)
        assert busy < 0.5, f"server used {busy:.0%} CPU while out of descriptors"
        for conn in served:  # existing connections still get answers
            assert conn.call(1, {"alive": True})["code"] == 0
        for conn in served[:8]:
            conn.close()
        del served[:8]
        for conn in pending:  # accept resumed (gevent's accept back-off is at most 1 s)
            assert conn.line(timeout=3)["code"] == 0
        assert proc.poll() is None
        log_text = open(log_path).read()
        assert "accept failed: Too many open files" in log_text
        assert "Traceback" not in log_text  # one warning, not a traceback per retry
        print(f"fd exhaustion: {len(served) + 8} served at RLIMIT_NOFILE={FD_LIMIT}, CPU while stuck {busy:.1%}")
    finally:
        for conn in served + pending:
            conn.close()
        proc.kill()
        proc.wait()
