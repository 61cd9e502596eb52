"""Worker-side features in real launcher processes: max_requests, connection age, heartbeat, logs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import gevent
import pytest

from tests.support.apps import write_app
from tests.support.launcher import Launcher, wait_spinning
from tests.support.rawconn import Caller, RawConn, call_once
from tests.support.system import wait_until

pytestmark = pytest.mark.subprocess


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_app(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_max_requests_with_jitter_restarts_workers_gracefully(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "1", "--max-requests", "20", "--max-requests-jitter", "5")
    try:
        caller = Caller(launcher.address)  # no STATS call first: every request here counts
        served: dict[int, int] = {}
        order: list[int] = []
        for i in range(90):
            reply = caller.call(9, request_id=i)
            assert reply["code"] == 0 and reply["id"] == i
            pid = reply["data"]["pid"]
            if pid not in served:
                order.append(pid)
            served[pid] = served.get(pid, 0) + 1
        caller.close()
        assert len(order) >= 3, served
        for pid in order[:-1]:  # every retired worker served its limit: 20 plus its jitter
            assert 20 <= served[pid] <= 25, served
        assert set(caller.goaways) == {"max_requests"}
        launcher.wait_log("autorestarting worker after")
    finally:
        launcher.close()


@pytest.mark.slow
@pytest.mark.parametrize("reuse_port", ["--reuse-port", "--no-reuse-port"])
def test_a_max_requests_restart_leaves_queued_connections_to_the_replacement(app_dir: Path, reuse_port: str) -> None:
    launcher = Launcher(app_dir, "--workers", "1", "--max-requests", "10", "--blocking-time", "0", reuse_port)
    try:
        first = int(launcher.wait_log(r"booting worker with pid (\d+)").group(1))
        launcher.wait_log(rf"listening on .*\(pid {first}\)")  # no STATS call: every request counts
        caller = Caller(launcher.address)
        for i in range(9):
            assert caller.call(9, request_id=i)["data"]["pid"] == first
        spin = gevent.spawn(caller.call, 7, {"seconds": 2})  # the 10th request: the worker restarts after it
        wait_spinning(app_dir, first)  # its event loop is blocked: nothing is accepted
        queued = [RawConn(launcher.address, timeout=30) for _ in range(5)]
        for i, conn in enumerate(queued):
            conn.request(9, id=i)
        assert not spin.ready(), "the connections must wait in the listen backlog while the worker restarts"
        assert spin.get(timeout=30)["data"] == "spun"
        for i, conn in enumerate(queued):  # the replacement serves them: no goaway for a restart
            reply = conn.line()
            assert reply["code"] == 0 and reply["id"] == i and "goaway" not in reply, reply
            assert reply["data"]["pid"] != first
            conn.close()
        assert caller.goaways == [] and caller.conn is not None
        assert caller.conn.line()["goaway"] == "max_requests"  # the retiring worker's own
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_worker_stuck_in_cpu_work_strands_no_new_connection_by_default(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2", "--blocking-time", "0")
    try:
        pids = launcher.wait_workers(2)
        caller = Caller(launcher.address)
        stuck = caller.call(9)["data"]["pid"]
        spin = gevent.spawn(caller.call, 7, {"seconds": 8})
        wait_spinning(app_dir, stuck)  # it spins: its event loop is blocked
        # Fresh connections: with one listener per worker (SO_REUSEPORT) about half would be hashed to
        # the stuck worker's socket and wait there for the spin (or the heartbeat kill) to end.
        served = [call_once(launcher.address, 9, timeout=2)["pid"] for _ in range(20)]
        assert not spin.ready(), "the calls must be made while the worker spins"
        assert set(served) == pids - {stuck}
        assert spin.get(timeout=30)["data"] == "spun"
    finally:
        launcher.close()


@pytest.mark.slow
def test_connection_older_than_max_connection_age_gets_a_goaway(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--max-connection-age", "0.5", "--max-connection-age-jitter", "0.2")
    try:
        launcher.wait_workers(1)
        caller = Caller(launcher.address)
        assert caller.call(1, {"n": 1})["data"] == {"n": 1}
        assert caller.conn is not None
        assert caller.conn.line(timeout=10) == {
            "code": 503, "cmdid": None, "goaway": "max_age", "msg": "server is going away (max_age)"}
        assert caller.conn.at_eof()  # then the server closes
        caller.close()
        assert caller.call(1, {"n": 2})["data"] == {"n": 2}  # the client reconnects, nothing lost
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_worker_stuck_past_timeout_is_aborted_and_replaced(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "1", "--timeout", "1", "--blocking-time", "0")
    try:
        (stuck,) = launcher.wait_workers(1)
        caller = Caller(launcher.address)
        with pytest.raises(Caller.MaybeExecutedError):
            caller.call(7, {"seconds": 8})  # spins the CPU: no heartbeat while it runs
        launcher.wait_log(rf"WORKER TIMEOUT \(pid:{stuck}\)")
        launcher.wait_log(rf"Worker \(pid:{stuck}\) was (killed by SIGABRT|sent SIGKILL)")
        assert launcher.wait_workers(1, exclude={stuck})
        assert "Current thread" in launcher.output or "Thread 0x" in launcher.output  # faulthandler's stack
    finally:
        launcher.close()


@pytest.mark.slow
def test_blocking_detector_names_the_cmdid_of_a_cpu_bound_handler(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--blocking-time", "0.1")
    try:
        launcher.wait_workers(1)
        caller = Caller(launcher.address)
        assert caller.call(1, {})["code"] == 0
        assert caller.call(7, {"seconds": 0.6}, request_id=41)["data"] == "spun"
        launcher.wait_log(r"event loop blocked for more than 0.1s by cmdid 7 \(id 41, peer 127\.0\.0\.1:\d+\)")
        assert caller.call(2, {"seconds": 0.5})["code"] == 0  # a cooperative sleep is no block
        # Positive control after it: the monitor thread reports in order, so once this block's report is
        # logged, a report about the echo or the sleep would be too. Every report must name a spin.
        assert caller.call(7, {"seconds": 0.6}, request_id=42)["data"] == "spun"
        launcher.wait_log(r"event loop blocked for more than 0.1s by cmdid 7 \(id 42, ", timeout=30)
        rows = [row for row in launcher.lines if "event loop blocked" in row]
        first_41 = next(i for i, row in enumerate(rows) if "(id 41, " in row)
        first_42 = next(i for i, row in enumerate(rows) if "(id 42, " in row)
        assert rows[:first_41] == [], rows  # the echo blocked nothing
        # Between the two spins only spin 41's own reports (a late one may find it returned and name no
        # request); the sleep, had it blocked the loop, would be named "cmdid 2".
        assert not [row for row in rows[first_41:first_42] if "by cmdid 7 (id 41, " not in row
                    and "no running request" not in row], rows
    finally:
        launcher.close()


@pytest.mark.slow
def test_access_log_lines_and_usr1_reopens_the_log_file(app_dir: Path) -> None:
    log_file = app_dir / "geventtcp.log"
    launcher = Launcher(app_dir, "--workers", "2", "--access-log", "--log-file", str(log_file), log_path=log_file)
    try:
        wait_until(lambda: log_file.exists() and log_file.read_text().count("listening on") >= 2)
        caller = Caller(launcher.address)
        assert caller.call(1, {"a": 1}, request_id=7)["code"] == 0
        assert caller.call(404, request_id=8)["code"] == 404  # unknown cmdids are not access-logged
        assert caller.call(1, {}, request_id=9)["code"] == 0
        wait_until(lambda: "cmdid=1 id=9 code=0" in log_file.read_text())
        lines = [line for line in log_file.read_text().splitlines() if "geventtcp.access" in line]
        assert len(lines) == 2 and "127.0.0.1:" in lines[0] and "cmdid=1 id=7 code=0" in lines[0]
        assert lines[0].endswith("ms")
        os.rename(log_file, app_dir / "geventtcp.log.1")  # logrotate moves the file...
        launcher.signal(signal.SIGUSR1)  # ...and asks for a reopen
        # The master and both workers each reopen (and say so in the new file).
        wait_until(lambda: log_file.exists() and log_file.read_text().count("log files reopened") == 3)
        assert caller.call(1, {}, request_id=10)["code"] == 0
        wait_until(lambda: "cmdid=1 id=10 code=0" in log_file.read_text())
        assert "id=10" not in (app_dir / "geventtcp.log.1").read_text()
        caller.close()
    finally:
        launcher.close()


@pytest.mark.slow
def test_log_config_dictconfig_file_routes_the_access_log(app_dir: Path) -> None:
    access_file = app_dir / "access.log"
    (app_dir / "logging.json").write_text(json.dumps({
        "version": 1,
        "formatters": {"bare": {"format": "ACCESS %(message)s"}},
        "handlers": {"access": {"class": "logging.FileHandler", "filename": str(access_file),
                                "formatter": "bare"}},
        "loggers": {"geventtcp.access": {"handlers": ["access"], "level": "INFO", "propagate": False}},
    }))
    launcher = Launcher(app_dir, "--access-log", "--log-config", str(app_dir / "logging.json"))
    try:
        launcher.wait_workers(1)
        assert call_once(launcher.address, 1, {"x": 1}) == {"x": 1}
        wait_until(lambda: access_file.exists() and "cmdid=1 id=1 code=0" in access_file.read_text())
        assert access_file.read_text().startswith("ACCESS 127.0.0.1:")
        assert "cmdid=1 id=1" not in launcher.output  # routed only to the dictConfig handler
    finally:
        launcher.close()
