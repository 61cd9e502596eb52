"""Three `geventtcp serve` servers behind a real HAProxy (deploy/haproxy.cfg); one is killed under load."""

from __future__ import annotations

import json
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

from tests.support.rawconn import RawConn
from tests.support.servers import CliServer
from tests.support.system import ROOT, terminate, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)


def _free_port() -> int:
    with stdsocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _haproxy_config(ports: list[int], front: int, stats_sock: str) -> str:
    """deploy/haproxy.cfg with our ports; servers beyond ``len(ports)`` are left out."""
    with open(os.path.join(ROOT, "deploy", "haproxy.cfg")) as fh:
        text = fh.read()
    text = text.replace("bind 127.0.0.1:8889", f"bind 127.0.0.1:{front}")
    text = text.replace("/tmp/haproxy-geventtcp.sock", stats_sock)
    for n, port in enumerate(ports, 1):
        text, count = re.subn(rf"server app{n} 127\.0\.0\.1:\d+", f"server app{n} 127.0.0.1:{port}", text)
        assert count == 1
    for n in range(len(ports) + 1, 4):
        text, count = re.subn(rf"\n *server app{n} .*", "", text)
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


def _server_stats(stats_sock: str) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat`` row of each backend server, by column name (status, chkfail, ...)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(stats_sock)
    s.sendall(b"show stat\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    rows = data.decode().splitlines()
    names = rows[0].lstrip("# ").split(",")
    servers = {}
    for row in rows[1:]:
        cols = row.split(",")
        if len(cols) > 17 and cols[0] == "geventtcp" and cols[1].startswith("app"):
            servers[cols[1]] = dict(zip(names, cols, strict=True))
    return servers


def _server_states(stats_sock: str) -> dict[str, str]:
    return {name: row["status"] for name, row in _server_stats(stats_sock).items()}


# A developer machine without HAProxy skips these; CI (CI=true, where .ci/run installs Debian's
# package) must run them, so there a missing binary is a failure, not a skip.
if HAPROXY is None and os.environ.get("CI"):
    raise RuntimeError("CI=true but haproxy is not installed: .ci/run must apt-get install haproxy")
needs_haproxy = pytest.mark.skipif(HAPROXY is None,
                                   reason="haproxy is not installed (.ci/run installs Debian's package)")


class Cluster:
    """Three ``geventtcp serve`` servers behind HAProxy (deploy/haproxy.cfg, ports rewritten)."""

    def __init__(self, tmp_path: str, master_worker: bool = False, n: int = 3, args: tuple[str, ...] = ()) -> None:
        # deploy/haproxy.cfg sends a PROXY v2 header on every connection (checks included).
        self.servers = [CliServer([sys.executable, "-m", "geventtcp", "serve", "handlers", "-b", "127.0.0.1:0",
                                   "--proxy-protocol", *args]) for _ in range(n)]
        self.stats_sock = os.path.join(tmp_path, "haproxy.sock")
        self.pidfile = os.path.join(tmp_path, "haproxy.pid")
        cfg = os.path.join(tmp_path, "haproxy.cfg")
        self.front = _free_port()
        with open(cfg, "w") as fh:
            fh.write(_haproxy_config([srv.port for srv in self.servers], self.front, self.stats_sock))
        assert HAPROXY is not None, "haproxy is not installed (.ci/run installs it)"
        argv = [HAPROXY, "-db", "-f", cfg] if not master_worker else [HAPROXY, "-W", "-db", "-f", cfg,
                                                                      "-p", self.pidfile]
        self.proxy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        all_up = {f"app{i}": "UP" for i in range(1, n + 1)}
        wait_until(lambda: os.path.exists(self.stats_sock) and _server_states(self.stats_sock) == all_up,
                   timeout=15, interval=0.1)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.front)

    def close(self) -> None:
        terminate(self.proxy, timeout=5)
        for srv in self.servers:
            srv.stop()


class Load:
    """``n`` clients with persistent connections calling echo; every outcome is recorded.

    A goaway line (the server did not process the request) makes a client resend on a new
    connection; EOF or a reset after sending is recorded as a broken call and the client reconnects.
    """

    def __init__(self, address: tuple[str, int], n: int = 12) -> None:
        self.address = address
        self.stop = False
        self.ok: list[tuple[float, int]] = []
        self.failures: list[tuple[float, str]] = []
        self.goaways: list[float] = []
        self.workers = [gevent.spawn(self._client, i) for i in range(n)]

    def _client(self, i: int) -> None:
        conn: RawConn | None = None
        seq = pid = 0
        while not self.stop:
            seq += 1
            try:
                if conn is None:
                    conn = RawConn(self.address, timeout=3)
                    first = conn.call(-1, id=0)
                    if first.get("goaway"):
                        raise ConnectionError("goaway")
                    pid = first["data"]["pid"]
                reply = conn.call(1, {"seq": seq, "client": i}, id=seq)
                if reply.get("goaway"):  # not processed: resend on a new connection
                    self.goaways.append(time.monotonic())
                    conn.close()
                    conn = None
                    continue
                assert reply == {"code": 0, "cmdid": 1, "id": seq, "data": {"seq": seq, "client": i}}
                self.ok.append((time.monotonic(), pid))
            except ConnectionError as exc:
                if str(exc) == "goaway":
                    self.goaways.append(time.monotonic())
                else:
                    self.failures.append((time.monotonic(), type(exc).__name__))
                if conn is not None:
                    conn.close()
                conn = None
            except (EOFError, OSError) as exc:  # the connection broke after sending
                self.failures.append((time.monotonic(), type(exc).__name__))
                if conn is not None:
                    conn.close()
                conn = None
            gevent.sleep(0.002)
        if conn is not None:
            conn.close()

    def finish(self) -> None:
        self.stop = True
        gevent.joinall(self.workers, timeout=10, raise_error=True)
        assert all(w.dead for w in self.workers), "a client hung"


@needs_haproxy
def test_three_servers_behind_haproxy_survive_a_kill(tmp_path: object) -> None:
    cluster = Cluster(str(tmp_path))
    load: Load | None = None
    try:
        load = Load(cluster.address)
        ok, failures = load.ok, load.failures
        # All three servers take traffic, and the load runs a while before the kill.
        wait_until(lambda: len(ok) > 500 and len({pid for _, pid in ok}) == 3, timeout=30)
        # Kill the first server's whole process family at once (master and workers: a crashed host).
        victims = family(cluster.servers[0].proc.pid)
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _server_states(cluster.stats_sock).get("app1") == "DOWN", timeout=30, interval=0.1)
        # Traffic goes on without the victim: wait for 100+ calls answered after the kill (+0.5 s).
        wait_until(lambda: sum(t > killed_at + 0.5 for t, _ in list(ok)) > 100, timeout=30, interval=0.1)
        load.finish()
        before = [pid for t, pid in ok if t < killed_at]
        after = [pid for t, pid in ok if t > killed_at + 0.5]
        print(f"haproxy kill: {len(before)} calls before the kill, {len(after)} after (+0.5 s), "
              f"{len(failures)} broken connections, victim served {sum(p in victims for p in before)}")
        assert sum(p in victims for p in before) > 50
        assert len(after) > 100 and not victims & set(after)
        assert set(after) <= family(cluster.servers[1].proc.pid) | family(cluster.servers[2].proc.pid)
        # Only connections that were on the killed server broke, each at most a few times while
        # HAProxy's check marked it down; nothing else failed.
        assert all(t >= killed_at for t, _ in failures)
        assert len(failures) <= 12 * 3
    finally:
        if load is not None:
            load.stop = True
        cluster.close()


@needs_haproxy
def test_rolling_restart_behind_haproxy_breaks_no_call(tmp_path: object) -> None:
    """SIGTERM one server under load: it drains (goaway), fails its health check, and no call is
    left in doubt: every client either got its reply or a goaway and resent elsewhere."""
    cluster = Cluster(str(tmp_path))
    load: Load | None = None
    try:
        load = Load(cluster.address)
        wait_until(lambda: len(load.ok) > 500 and len({pid for _, pid in load.ok}) == 3, timeout=30)
        draining = family(cluster.servers[0].proc.pid)
        stopped_at = time.monotonic()
        os.kill(cluster.servers[0].proc.pid, signal.SIGTERM)
        wait_until(lambda: _server_states(cluster.stats_sock).get("app1") == "DOWN", timeout=30, interval=0.1)
        wait_until(lambda: cluster.servers[0].proc.poll() is not None, timeout=30)
        # Traffic goes on without the drained server: wait for 100+ calls answered after it (+1 s).
        wait_until(lambda: sum(t > stopped_at + 1.0 for t, _ in list(load.ok)) > 100, timeout=30, interval=0.1)
        load.finish()
        after = [pid for t, pid in load.ok if t > stopped_at + 1.0]
        print(f"haproxy rolling restart: {len(load.ok)} calls, {len(load.goaways)} goaways (resent), "
              f"{len(load.failures)} broken")
        assert load.failures == []  # no reset, no EOF after sending: nothing "maybe executed"
        assert load.goaways  # the drained connections were told, and moved
        assert len(after) > 100 and not draining & set(after)
    finally:
        if load is not None:
            load.stop = True
        cluster.close()


@needs_haproxy
def test_haproxy_reload_under_load_breaks_no_call(tmp_path: object) -> None:
    """Master-worker HAProxy reloaded (SIGUSR2) under load: existing connections stay on the old
    process, new ones go to the new one; no connect is refused and no call breaks."""
    cluster = Cluster(str(tmp_path), master_worker=True)
    load: Load | None = None
    try:
        load = Load(cluster.address)
        wait_until(lambda: len(load.ok) > 300, timeout=10)
        extra: list[int] = []

        def newcomer() -> None:  # fresh connections across the reload
            while not load.stop:
                with RawConn(cluster.address, timeout=3) as conn:
                    extra.append(conn.call(1, {"new": True}, id=1)["code"])
                gevent.sleep(0.01)

        fresh = gevent.spawn(newcomer)
        before = len(load.ok)
        cluster.proxy.send_signal(signal.SIGUSR2)  # master-worker reload
        wait_until(lambda: len(load.ok) > before + 1000 and len(extra) > 50, timeout=15)
        load.finish()
        fresh.join(timeout=5)
        assert fresh.dead and fresh.exception is None, fresh.exception
        print(f"haproxy reload: {len(load.ok)} calls, {len(extra)} fresh connections, "
              f"{len(load.failures)} broken, {len(load.goaways)} goaways")
        assert load.failures == [] and set(extra) == {0}
    finally:
        if load is not None:
            load.stop = True
        cluster.close()


_ACCESS = re.compile(r"(\d+\.\d+\.\d+\.\d+):(\d+) cmdid=(-?\d+) ")


def _access_log(path: str) -> list[tuple[str, int, int]]:
    """(client ip, client port, cmdid) of each access-log line the server wrote so far."""
    with open(path) as fh:
        return [(m[1], int(m[2]), int(m[3])) for m in _ACCESS.finditer(fh.read())]


@needs_haproxy
def test_300_clients_through_haproxy_to_one_server(tmp_path: object) -> None:
    """Every connection reaches the server from HAProxy's address: with the old default per-peer
    limit of 256, client 257 got a 503, then the health check was refused, the server marked DOWN
    and new clients got a bare EOF. With default settings all are served, the check stays UP, and
    the PROXY header gives the server each client's own address (clients bind 127.0.0.2..51)."""
    log_file = os.path.join(str(tmp_path), "access.log")
    log_config = os.path.join(str(tmp_path), "logging.json")
    with open(log_config, "w") as fh:  # the access log to a file (stdout is a pipe nobody drains)
        json.dump({"handlers": {"file": {"class": "logging.FileHandler", "filename": log_file}},
                   "loggers": {"geventtcp.access": {"handlers": ["file"], "propagate": False}}}, fh)
    cluster = Cluster(str(tmp_path), n=1, args=("--access-log", "--log-config", log_config))
    conns: list[RawConn] = []
    try:
        for i in range(320):
            conn = RawConn(cluster.address, source=f"127.0.0.{2 + i % 50}", timeout=10)
            conns.append(conn)
            conn.request(1, {"client": i}, id=i)
        replies = [conn.line() for conn in conns]
        assert replies == [{"code": 0, "cmdid": 1, "id": i, "data": {"client": i}} for i in range(320)]
        # Health checks go on while the 320 connections stay open: wait for three more, then
        # the server is still UP, no check failed, and fresh clients are still served.
        def checks() -> int:  # PINGs from HAProxy itself (a LOCAL header keeps 127.0.0.1)
            return sum(ip == "127.0.0.1" and cmdid == -1 for ip, _, cmdid in _access_log(log_file))

        seen = checks()
        wait_until(lambda: checks() >= seen + 3, timeout=15, interval=0.1)
        row = _server_stats(cluster.stats_sock)["app1"]
        assert row["status"] == "UP" and row["chkfail"] == "0" and row["scur"] == "320", row
        for j in range(20):
            with RawConn(cluster.address, timeout=10) as fresh:
                assert fresh.call(1, {"fresh": j}, id=j)["code"] == 0
        assert all(conn.call(1, {"again": True})["code"] == 0 for conn in conns)
        # The server saw each client's own address and port, not HAProxy's.
        seen_clients = {(ip, port) for ip, port, cmdid in _access_log(log_file) if cmdid == 1}
        clients = {conn.sock.getsockname()[:2] for conn in conns}
        assert clients <= seen_clients and not any(ip == "127.0.0.1" for ip, _ in clients)
        assert len({ip for ip, _ in clients}) == 50
    finally:
        for conn in conns:
            conn.close()
        cluster.close()
