"""The launcher as real processes: worker count, crash recovery, TERM/INT, HUP reload, TTIN/TTOU, boot errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import pytest

from geventtcp.launcher.supervisor import BOOT_FAILURE_LIMIT
from tests.support.apps import APP_SOURCE, write_app
from tests.support.launcher import Launcher, wait_inflight, wait_spinning
from tests.support.rawconn import Caller, RawConn, call_once
from tests.support.system import ROOT, wait_until

pytestmark = pytest.mark.subprocess


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_app(tmp_path)
    return tmp_path


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc), zombies excluded."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


class Load:
    """``n`` callers calling ``cmdid`` back to back until stopped; tallies every outcome.

    ``fresh``: a new connection for every call (connection churn), so some always wait in a listen backlog.
    """

    def __init__(self, address: Any, n: int, cmdid: int = 9, params: dict[str, Any] | None = None,
                 fresh: bool = False) -> None:
        self.callers = [Caller(address) for _ in range(n)]
        self.ok = 0
        self.errors: list[Any] = []
        self.maybe_executed = 0
        self.pids: dict[int, int] = {}
        self.running = True
        self.cmdid, self.params, self.fresh = cmdid, params, fresh
        self.greenlets = [gevent.spawn(self._run, c, i) for i, c in enumerate(self.callers)]

    def _run(self, caller: Caller, index: int) -> None:
        seq = 0
        while self.running:
            seq += 1
            try:
                reply = caller.call(self.cmdid, self.params, request_id=seq)
            except Caller.MaybeExecutedError:
                self.maybe_executed += 1
                continue
            except ConnectionRefusedError:
                return  # the server is gone (after a stop): nothing was sent
            except ConnectionResetError:
                continue  # reset before anything was sent: counted by the caller, try again
            if self.fresh:
                caller.close()
            if reply.get("code") == 0 and reply.get("id") == seq:
                self.ok += 1
                pid = reply["data"].get("pid")
                self.pids[pid] = self.pids.get(pid, 0) + 1
            else:
                self.errors.append(reply)

    def stop(self, timeout: float = 20.0) -> None:
        self.running = False
        gevent.joinall(self.greenlets, timeout=timeout, raise_error=True)
        assert all(g.dead for g in self.greenlets), "a caller hung"
        for caller in self.callers:
            caller.close()

    @property
    def refused(self) -> int:
        return sum(c.refused for c in self.callers)


@pytest.mark.slow
@pytest.mark.parametrize("reuse_port", ["--reuse-port", "--no-reuse-port"])
def test_workers_serve_every_listener_and_the_master_exits_on_term(app_dir: Path, reuse_port: str) -> None:
    sock_path = str(app_dir / "ops.sock")
    launcher = Launcher(app_dir, "--workers", "3", "--bind", f"unix:{sock_path}", reuse_port)
    try:
        pids = launcher.wait_workers(3)
        assert pids == _children(launcher.master)
        assert call_once(sock_path, 1, {"via": "unix"}) == {"via": "unix"}
        served = {call_once(launcher.address, 9)["pid"] for _ in range(60)}
        assert served <= pids
        if reuse_port == "--reuse-port":  # the kernel spreads connections over the workers' sockets
            assert served == pids
        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30) == 0
    finally:
        launcher.close()
    assert not os.path.exists(sock_path), "the master removes its unix socket file"
    assert not any(os.path.exists(f"/proc/{pid}") and _children(launcher.master) for pid in pids)


@pytest.mark.slow
def test_kill_9_of_a_worker_under_load_is_replaced_and_every_call_ends_clearly(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2")
    try:
        pids = launcher.wait_workers(2)
        load = Load(launcher.address, 20, cmdid=2, params={"seconds": 0.01})
        wait_until(lambda: load.ok > 100, 30)
        victim = max(load.pids, key=lambda pid: load.pids[pid])  # it holds connections for sure
        survivor = (pids - {victim}).pop()
        os.kill(victim, signal.SIGKILL)
        launcher.wait_log(rf"Worker \(pid:{victim}\) was sent SIGKILL")
        new = launcher.wait_workers(2, exclude={victim})  # the replacement answers STATS: it serves
        assert survivor in new, "the other worker is not disturbed"
        assert call_once(launcher.address, 1, {"after": "kill"}) == {"after": "kill"}
        ok_before = load.ok
        wait_until(lambda: load.ok > ok_before + 100, 30)  # the callers reconnected and go on
        load.stop()
        assert load.errors == [] and load.refused == 0
        # Only the calls in flight on the killed worker may end as "maybe executed"; none hangs.
        assert load.maybe_executed <= 20
    finally:
        launcher.close()


@pytest.mark.slow
def test_term_under_load_answers_every_request_and_exits_within_graceful_timeout(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2", "--graceful-timeout", "30")
    try:
        launcher.wait_workers(2)
        load = Load(launcher.address, 30, cmdid=2, params={"seconds": 0.3})
        wait_until(lambda: load.ok >= 30, 30)
        start = time.monotonic()
        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30 + 10) == 0
        elapsed = time.monotonic() - start
        load.stop()
        # Every request written before the drain was answered; the rest got a goaway (not run).
        assert load.maybe_executed == 0 and load.errors == []
        assert sum(len(c.goaways) for c in load.callers) >= 1
        assert elapsed < 30  # the drain finished: the graceful timeout did not have to cut it off
    finally:
        launcher.close()


@pytest.mark.slow
def test_term_with_a_handler_longer_than_graceful_timeout_ends_it_and_exits(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "1", "--graceful-timeout", "3")
    try:
        launcher.wait_workers(1)
        slow, quick = Caller(launcher.address), Caller(launcher.address)
        sleeper = gevent.spawn(slow.call, 2, {"seconds": 60})
        short = gevent.spawn(quick.call, 2, {"seconds": 1})
        wait_inflight(launcher.address, 2, 2)  # both requests were read and are running
        start = time.monotonic()
        launcher.signal(signal.SIGTERM)
        assert short.get(timeout=30)["code"] == 0  # the request that fits in graceful_timeout is answered
        with pytest.raises(Caller.MaybeExecutedError):  # cut off at graceful_timeout: it may have run
            sleeper.get(timeout=30)
        assert launcher.wait_exit(30) == 0
        # Ended by the graceful timeout (3 s), not by the 60 s handler finishing: generous for a loaded host.
        assert time.monotonic() - start < 3 + 20
        launcher.wait_log("graceful timeout: closing")
        assert "SIGKILL" not in launcher.output  # the worker stopped its handlers and exited itself
    finally:
        launcher.close()


@pytest.mark.slow
def test_sigint_stops_at_once(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2", "--graceful-timeout", "30")
    try:
        launcher.wait_workers(2)
        caller = Caller(launcher.address)
        sleeper = gevent.spawn(caller.call, 2, {"seconds": 60})
        wait_inflight(launcher.address, 2, 1)  # read and running: INT must cut it off
        start = time.monotonic()
        launcher.signal(signal.SIGINT)
        assert launcher.wait_exit(20) == 0
        assert time.monotonic() - start < 20  # at once, not after the 30 s graceful timeout nor the 60 s handler
        with pytest.raises(Caller.MaybeExecutedError):
            sleeper.get(timeout=10)
    finally:
        launcher.close()


@pytest.mark.slow
def test_hup_under_load_reloads_the_app_with_no_refused_connection_and_no_lost_request(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2", "--graceful-timeout", "10")
    try:
        old = launcher.wait_workers(2)
        load = Load(launcher.address, 20)
        wait_until(lambda: load.ok > 200, 30)
        write_app(app_dir, version="v2")  # the new workers import the application again
        launcher.signal(signal.SIGHUP)
        new = launcher.wait_workers(2, exclude=old)
        wait_until(lambda: all(load.pids.get(pid) for pid in new), 30)  # connections moved (goaway "reload")
        wait_until(lambda: not (_children(launcher.master) & old), 30)
        # Fresh connections reach the new generation, whose handlers were re-imported.
        assert call_once(launcher.address, 9)["version"] == "v2"
        load.stop()
        assert load.refused == 0
        assert load.maybe_executed == 0 and load.errors == []
        assert "reload" in {g for c in load.callers for g in c.goaways}
    finally:
        launcher.close()


@pytest.mark.slow
def test_ttin_and_ttou_change_the_number_of_workers(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "1")
    try:
        first = launcher.wait_workers(1)
        launcher.signal(signal.SIGTTIN)  # one at a time: the kernel merges a signal sent twice quickly
        assert first < launcher.wait_workers(2)
        launcher.signal(signal.SIGTTIN)
        three = launcher.wait_workers(3)
        assert first < three
        launcher.signal(signal.SIGTTOU)
        two = launcher.wait_workers(2)
        assert first < two and two < three, "TTOU retires the worker of the highest slot"
        wait_until(lambda: len(_children(launcher.master)) == 2, 30)
        # The retired slot's socket is closed everywhere: new connections all reach a live worker.
        for _ in range(30):
            assert call_once(launcher.address, 9, timeout=3)["pid"] in two
    finally:
        launcher.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "--reuse-port"])
def test_ttin_ttou_storm_under_connection_churn_resets_no_connection(app_dir: Path, mode: str) -> None:
    # default: one listener shared by all workers, which TTOU leaves open. --reuse-port (the default
    # before): TTOU closes the retired slot's own socket, which gets new connections until it is
    # closed; they were reset when it closed while some still waited in its backlog.
    launcher = Launcher(app_dir, "--workers", "2", *([] if mode == "default" else [mode]))
    try:
        launcher.wait_workers(2)
        load = Load(launcher.address, 40, fresh=True)
        wait_until(lambda: load.ok > 200, 30)
        for _ in range(10):
            launcher.signal(signal.SIGTTIN)
            launcher.wait_workers(3)
            launcher.signal(signal.SIGTTOU)
            wait_until(lambda: len(_children(launcher.master)) == 2, 30)  # the retired worker exited
        ok_before = load.ok
        wait_until(lambda: load.ok > ok_before + 100, 30)
        load.stop()
        assert load.errors == [] and load.refused == 0
        # A reset connection: in the handshake (the caller retries), or after the request was written,
        # when the caller cannot tell whether it ran (maybe_executed). Never the latter; with
        # --reuse-port, a handshake still in flight when the retired slot's socket closes is reset by
        # the kernel unless net.ipv4.tcp_migrate_req=1 (a host setting the tests leave alone): the
        # caller saw it at connect, before writing, so it knows the request did not run.
        resets = sum(c.reset_at_connect for c in load.callers)
        assert resets == 0 if mode == "default" else resets <= 2, resets
        assert load.maybe_executed == 0
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_broken_application_halts_the_master_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "brokenapp.py").write_text("raise ImportError('the database driver is missing')\n")
    launcher = Launcher(tmp_path, "--workers", "2", app="brokenapp")
    try:
        assert launcher.wait_exit(20) == 3
        assert "the database driver is missing" in launcher.output
        assert "worker failed to boot" in launcher.output
    finally:
        launcher.close()


@pytest.mark.slow
def test_hup_rereads_the_config_file_and_pidfile_lives_as_long_as_the_master(app_dir: Path) -> None:
    conf = app_dir / "geventtcp.conf.py"
    conf.write_text("workers = 1\n")
    pidfile = app_dir / "master.pid"
    launcher = Launcher(app_dir, "-c", str(conf), "--pidfile", str(pidfile))
    try:
        (first,) = launcher.wait_workers(1)
        assert pidfile.read_text().strip() == str(launcher.master)
        conf.write_text("workers = 2\n")
        launcher.signal(signal.SIGHUP)
        assert first not in launcher.wait_workers(2, exclude={first})
        conf.write_text("workers = 'many'\n")  # a broken config is reported, and the old one kept
        launcher.signal(signal.SIGHUP)
        launcher.wait_log(r"reload: configuration not reloaded: workers")
        assert len(launcher.wait_workers(2)) == 2
        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30) == 0  # idle workers: well before the 30 s graceful timeout's margin
        assert not pidfile.exists()
    finally:
        launcher.close()


@pytest.mark.slow
@pytest.mark.parametrize("reuse_port", ["--reuse-port", "--no-reuse-port"])
def test_a_second_server_on_a_busy_port_fails_and_leaves_the_first_alone(app_dir: Path, reuse_port: str) -> None:
    pidfile = app_dir / "master.pid"
    first = Launcher(app_dir, "--pidfile", str(pidfile), reuse_port)
    try:
        first.wait_workers(1)
        port = str(first.address[1])
        second = subprocess.run(
            [sys.executable, "-m", "geventtcp", "serve", "opsapp", "--bind", f"127.0.0.1:{port}", "--pidfile",
             str(pidfile), reuse_port], capture_output=True, text=True, timeout=30, cwd=str(app_dir),
            env={**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"})
        assert second.returncode == 2 and "Address already in use" in second.stderr
        assert pidfile.read_text().strip() == str(first.master)  # not the failed instance's to remove
        assert call_once(first.address, 1, {"still": "here"}) == {"still": "here"}
    finally:
        first.close()


@pytest.mark.slow
def test_a_reload_that_cannot_boot_keeps_the_previous_workers_serving(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2")
    try:
        old = launcher.wait_workers(2)
        (app_dir / "opsapp.py").write_text("raise ImportError('half-deployed release')\n")
        launcher.signal(signal.SIGHUP)
        launcher.wait_log("reload failed: the new application cannot boot")
        assert "half-deployed release" in launcher.output
        for _ in range(10):
            reply = call_once(launcher.address, 9)
            assert reply["version"] == "v1" and reply["pid"] in old
        assert launcher.proc.poll() is None
        write_app(app_dir, version="v3")  # the fixed release reloads normally
        launcher.signal(signal.SIGHUP)
        launcher.wait_workers(2, exclude=old)
        assert call_once(launcher.address, 9)["version"] == "v3"
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_failed_reload_restores_the_configuration_the_previous_workers_serve_with(app_dir: Path) -> None:
    """A reload that cannot boot falls back to what served before it: its workers and its configuration.
    Keeping the new one (here: one worker more) made the master fork a worker of the broken release
    for the extra slot right away, and halt once three of those had failed."""
    conf = app_dir / "geventtcp.conf.py"
    conf.write_text("workers = 1\n")
    launcher = Launcher(app_dir, "-c", str(conf))
    try:
        (old,) = launcher.wait_workers(1)
        conf.write_text("workers = 2\n")
        (app_dir / "opsapp.py").write_text("raise ImportError('half-deployed release')\n")
        launcher.signal(signal.SIGHUP)
        launcher.wait_log("reload failed: the new application cannot boot")
        assert call_once(launcher.address, 9) == {"pid": old, "version": "v1"}
        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30) == 0
        after = launcher.output.split("reload failed")[1]
        assert "booting worker" not in after, launcher.output  # the abort and a spawn share a loop iteration
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_failed_reload_overtaking_a_slow_one_restores_only_the_serving_generation(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2", "--graceful-timeout", "5")
    try:
        old = launcher.wait_workers(2)
        # v2 boots slowly: each worker marks that it has read the module, then imports for 4 s more.
        slow = "import os, time\nopen(f'importing-{os.getpid()}', 'w').close()\ntime.sleep(4)\n"
        (app_dir / "opsapp.py").write_text(slow + APP_SOURCE.format(version="v2"))
        launcher.signal(signal.SIGHUP)
        wait_until(lambda: len(list(app_dir.glob("importing-*"))) == 2, 20)
        # Overtaken while v2 still imports: v3 cannot boot at all.
        (app_dir / "opsapp.py").write_text("raise ImportError('half-deployed release')\n")
        launcher.signal(signal.SIGHUP)
        launcher.wait_log("reload failed: the new application cannot boot")
        # Once things settle, only the generation that served before the reloads is left: N
        # workers of one code version, not N of v1 plus N of the abandoned v2.
        wait_until(lambda: _children(launcher.master) == old, 30)
        assert launcher.wait_workers(2) == old
        for _ in range(20):
            reply = call_once(launcher.address, 9)
            assert reply["version"] == "v1" and reply["pid"] in old
        assert _children(launcher.master) == old
        write_app(app_dir, version="v4")  # the fixed release reloads normally
        launcher.signal(signal.SIGHUP)
        launcher.wait_workers(2, exclude=old)
        assert call_once(launcher.address, 9)["version"] == "v4"
    finally:
        launcher.close()


def _caller_on(address: Any, pid: int) -> Caller:
    """A caller whose connection is served by worker ``pid`` (a shared listener: try until it lands there)."""
    for _ in range(200):
        caller = Caller(address)
        if caller.call(9)["data"]["pid"] == pid:
            return caller
        caller.close()
    raise AssertionError(f"no connection reached worker {pid} in 200 tries")


@pytest.mark.slow
@pytest.mark.parametrize("retire", ["ttou", "hup"])
def test_term_right_after_a_retire_answers_the_backlog_a_busy_retiring_worker_holds(app_dir: Path,
                                                                                     retire: str) -> None:
    # Shared listener. The retiring worker is told USR2 (TTOU) or HUP (a reload), which leave its backlog to
    # the other workers, while its event loop is blocked; the master's TERM follows at once. The other
    # worker answers its backlog and closes its copy of the listener; the busy worker then holds the only
    # copy, and connections made meanwhile wait in it. Its TERM must answer them with a goaway: it used to
    # find the worker already draining (from USR2/HUP) and do nothing, and closing the listener reset them.
    launcher = Launcher(app_dir, "--workers", "2", "--blocking-time", "0")
    try:
        launcher.wait_workers(2)
        busy = int(launcher.wait_log(r"booting worker with pid (\d+) \(slot 1").group(1))
        other = int(launcher.wait_log(r"booting worker with pid (\d+) \(slot 0").group(1))
        caller = _caller_on(launcher.address, busy)
        spin = gevent.spawn(caller.call, 7, {"seconds": 4})
        wait_spinning(app_dir, busy)  # its event loop is blocked
        if retire == "ttou":
            launcher.signal(signal.SIGTTOU)
            launcher.wait_log(r"workers: 1")
        else:  # the old workers are told HUP once the new generation serves: the idle one exits at once
            launcher.signal(signal.SIGHUP)
            launcher.wait_log(rf"Worker \(pid:{other}\) exited")
        launcher.signal(signal.SIGTERM)
        wait_until(lambda: _children(launcher.master) == {busy}, 20)  # every other worker has stopped
        queued = [RawConn(launcher.address, timeout=30) for _ in range(3)]
        for i, conn in enumerate(queued):
            conn.request(9, id=i)
        assert not spin.ready(), "the connections must be made while the retiring worker is busy"
        for conn in queued:
            line = conn.readline()
            assert line.endswith(b"\n"), f"connection closed without a goaway ({line!r})"
            reply = json.loads(line)
            assert reply.get("goaway") == "shutdown" or reply.get("code") == 0, reply
            conn.close()
        assert launcher.wait_exit(30) == 0
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_reload_to_fewer_workers_answers_the_backlog_of_a_retired_reuse_port_slot(app_dir: Path) -> None:
    # --reuse-port, a reload from 2 workers to 1: slot 1's socket is closed in the master at once and
    # closes for good with its old worker. That worker was told HUP, which leaves the backlog to a
    # replacement (there is none for slot 1): connections queued in its socket while it was busy were
    # reset when it closed. It must answer them with a goaway, as a TTOU-retired slot does.
    conf = app_dir / "geventtcp.conf.py"
    conf.write_text("workers = 2\n")
    launcher = Launcher(app_dir, "-c", str(conf), "--reuse-port", "--blocking-time", "0")
    try:
        launcher.wait_workers(2)
        busy = int(launcher.wait_log(r"booting worker with pid (\d+) \(slot 1").group(1))
        other = int(launcher.wait_log(r"booting worker with pid (\d+) \(slot 0").group(1))
        caller = _caller_on(launcher.address, busy)
        spin = gevent.spawn(caller.call, 7, {"seconds": 4})
        wait_spinning(app_dir, busy)  # its event loop is blocked
        conf.write_text("workers = 1\n")
        launcher.signal(signal.SIGHUP)
        launcher.wait_log(rf"Worker \(pid:{other}\) exited")  # the new worker serves: the old ones were told
        # The kernel hashes each connection to slot 0's socket (the new worker) or slot 1's (busy):
        # about half of them wait in the busy worker's backlog.
        conns = [RawConn(launcher.address, timeout=30) for _ in range(12)]
        for i, conn in enumerate(conns):
            conn.request(9, id=i)
        assert not spin.ready(), "the connections must be made while the retiring worker is busy"
        for conn in conns:
            line = conn.readline()
            assert line.endswith(b"\n"), f"connection closed without a goaway ({line!r})"
            reply = json.loads(line)
            assert reply.get("goaway") or reply.get("code") == 0, reply
            conn.close()
        assert spin.get(timeout=30)["data"] == "spun"
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_reload_that_cannot_boot_keeps_more_workers_than_the_boot_failure_limit_serving(app_dir: Path) -> None:
    # Every worker of the failed generation fails to import, not only the first: those the abort
    # stops are already importing (a TERM waits for the hub), so they exit with the boot error too.
    # Those are not a new failure (the reload is already abandoned) and must not halt the master.
    workers = BOOT_FAILURE_LIMIT + 1
    launcher = Launcher(app_dir, "--workers", str(workers))
    try:
        old = launcher.wait_workers(workers)
        (app_dir / "opsapp.py").write_text("import time\ntime.sleep(1)\nraise ImportError('half-deployed release')\n")
        launcher.signal(signal.SIGHUP)
        launcher.wait_log("reload failed: the new application cannot boot")
        wait_until(lambda: _children(launcher.master) == old or launcher.proc.poll() is not None, 30)
        assert launcher.proc.poll() is None, launcher.output[-3000:]
        assert launcher.wait_workers(workers) == old
        for _ in range(10):
            reply = call_once(launcher.address, 9)
            assert reply["version"] == "v1" and reply["pid"] in old
    finally:
        launcher.close()
