"""Three `geventtcp serve` servers behind a real HAProxy (deploy/haproxy.cfg); one is killed under load."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket as stdsocket
import subprocess
import sys
import time

import gevent
import pytest
from gevent import socket

from .helpers import ROOT, CliServer
from .reltools import RawConn, wait_until

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)


def _free_port() -> int:
    with stdsocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _haproxy_config(ports: list[int], front: int, stats_sock: str) -> str:
    with open(os.path.join(ROOT, "deploy", "haproxy.cfg")) as fh:
        text = fh.read()
    text = text.replace("bind 127.0.0.1:8889", f"bind 127.0.0.1:{front}")
    text = text.replace("/tmp/haproxy-geventtcp.sock", stats_sock)
    for n, port in enumerate(ports, 1):
        text, count = re.subn(rf"server app{n} 127\.0\.0\.1:\d+", f"server app{n} 127.0.0.1:{port}", text)
        assert count == 1
    return text


def family(pid: int) -> set[int]:
    """``pid`` and all its descendants (a launcher master and its workers)."""
    pids = {pid}
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            for child in fh.read().split():
                pids |= family(int(child))
    except OSError:
        pass
    return pids


def _server_states(stats_sock: str) -> dict[str, str]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(stats_sock)
    s.sendall(b"show stat\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    states = {}
    for row in data.decode().splitlines():
        cols = row.split(",")
        if len(cols) > 17 and cols[0] == "geventtcp" and cols[1].startswith("app"):
            states[cols[1]] = cols[17]
    return states


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs Debian's package)")
def test_three_servers_behind_haproxy_survive_a_kill(tmp_path: object) -> None:
    servers = [CliServer([sys.executable, "-m", "geventtcp", "serve", "handlers", "-b", "127.0.0.1:0"])
               for _ in range(3)]
    stats_sock = os.path.join(str(tmp_path), "haproxy.sock")
    cfg = os.path.join(str(tmp_path), "haproxy.cfg")
    front = _free_port()
    with open(cfg, "w") as fh:
        fh.write(_haproxy_config([s.port for s in servers], front, stats_sock))
    proxy = subprocess.Popen([HAPROXY, "-db", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stop = False
    ok: list[tuple[float, int]] = []
    failures: list[tuple[float, str]] = []
    try:
        wait_until(lambda: os.path.exists(stats_sock) and _server_states(stats_sock) == dict.fromkeys(
            ("app1", "app2", "app3"), "UP"), timeout=15, interval=0.1)
        address = ("127.0.0.1", front)

        def client(i: int) -> None:
            conn: RawConn | None = None
            seq = 0
            while not stop:
                seq += 1
                try:
                    if conn is None:
                        conn = RawConn(address, timeout=3)
                        pid = conn.call(-1, id=0)["data"]["pid"]
                    reply = conn.call(1, {"seq": seq, "client": i}, id=seq)
                    if reply.get("goaway"):  # not processed: resend on a new connection
                        failures.append((time.monotonic(), "goaway"))
                        conn.close()
                        conn = None
                        continue
                    assert reply == {"code": 0, "cmdid": 1, "id": seq, "data": {"seq": seq, "client": i}}
                    ok.append((time.monotonic(), pid))
                except (EOFError, OSError) as exc:  # the connection broke: reconnect (echo is idempotent)
                    failures.append((time.monotonic(), type(exc).__name__))
                    if conn is not None:
                        conn.close()
                    conn = None
                gevent.sleep(0.002)
            if conn is not None:
                conn.close()

        workers = [gevent.spawn(client, i) for i in range(12)]
        # All three servers take traffic, and the load runs a while before the kill.
        wait_until(lambda: len(ok) > 500 and len({pid for _, pid in ok}) == 3, timeout=10)
        # Kill the first server's whole process family at once (master and workers: a crashed host).
        victims = family(servers[0].proc.pid)
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _server_states(stats_sock).get("app1") == "DOWN", timeout=10, interval=0.1)
        gevent.sleep(1.0)
        stop = True
        gevent.joinall(workers, timeout=10, raise_error=True)
        before = [pid for t, pid in ok if t < killed_at]
        after = [pid for t, pid in ok if t > killed_at + 0.5]
        print(f"haproxy: {len(before)} calls before the kill, {len(after)} after (+0.5 s), "
              f"{len(failures)} broken connections, victim served {sum(p in victims for p in before)}")
        assert sum(p in victims for p in before) > 50
        assert len(after) > 100 and not victims & set(after)
        assert set(after) <= family(servers[1].proc.pid) | family(servers[2].proc.pid)
        # Only connections that were on the killed server broke, each at most a few times while
        # HAProxy's check marked it down; nothing else failed.
        assert all(t >= killed_at for t, _ in failures)
        assert len(failures) <= 12 * 3
    finally:
        stop = True
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proxy.kill()
        for s in servers:
            s.stop()
