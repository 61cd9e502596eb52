"""Lifecycle hooks in real launcher processes: each hook (config file and application module) appends a
line ``NAME PID ...`` to ``events.log`` on each event; the tests wait for the lines, never sleep."""

from __future__ import annotations

import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.support.apps import write_app
from tests.support.launcher import Launcher
from tests.support.rawconn import Caller
from tests.support.system import env, python_cmd, wait_until

pytestmark = pytest.mark.subprocess

#: A config file setting every hook; each appends one line (hook name, its process id, details).
CONFIG = textwrap.dedent('''
    import atexit
    import os

    workers = 2

    def _mark(*words):
        with open("events.log", "a") as fh:
            fh.write(" ".join(str(word) for word in words) + "\\n")

    # Read by the master: this handler is the master's, and must never run in a worker, which fork copies it into.
    atexit.register(lambda: _mark("master_atexit", os.getpid()))

    def on_starting(server):
        _mark("on_starting", os.getpid(), server.pid)

    def when_ready(server):
        _mark("when_ready", os.getpid(), server.num_workers)

    def on_reload(server):
        _mark("on_reload", os.getpid(), server.generation)

    def pre_fork(server, worker):
        _mark("pre_fork", os.getpid(), worker.pid, worker.age)

    def post_fork(server, worker):
        _mark("post_fork", os.getpid(), worker.pid, server.pid, worker.age)

    def post_worker_init(worker):
        _mark("post_worker_init", os.getpid(), worker.pid)

    def worker_int(worker):
        _mark("worker_int", os.getpid(), worker.exit_reason)

    def worker_abort(worker):
        _mark("worker_abort", os.getpid(), worker.exit_reason)

    def worker_exit(server, worker):
        _mark("worker_exit", os.getpid(), worker.exit_reason)

    def on_exit(server):
        _mark("on_exit", os.getpid())
''')

#: Appended to the test application: hooks by decorator, and an atexit handler registered at import.
APP_HOOKS = textwrap.dedent('''

    import atexit

    def _app_mark(*words):
        with open("events.log", "a") as fh:
            fh.write(" ".join(str(word) for word in words) + "\\n")

    atexit.register(_app_mark, "atexit", os.getpid())

    @registry.hook("post_worker_init")
    def app_ready(worker):
        _app_mark("app_post_worker_init", os.getpid())

    @registry.hook("worker_exit")
    def app_exit(server, worker):
        _app_mark("app_worker_exit", os.getpid(), worker.exit_reason)
''')


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_app(tmp_path)
    with open(tmp_path / "opsapp.py", "a") as fh:
        fh.write(APP_HOOKS)
    (tmp_path / "hooks_conf.py").write_text(CONFIG)
    return tmp_path


def _events(app_dir: Path) -> list[list[str]]:
    try:
        text = (app_dir / "events.log").read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines()]


def _pids(app_dir: Path, name: str) -> list[int]:
    return [int(event[1]) for event in _events(app_dir) if event[0] == name]


def _wait_exited(app_dir: Path, pids: set[int], reason: str, timeout: float = 30) -> None:
    """Wait until each of ``pids`` logged its whole clean exit: both worker_exit hooks (with ``reason``)
    and then its atexit handler; checks the order."""
    def done() -> bool:
        return pids <= set(_pids(app_dir, "atexit"))

    try:
        wait_until(done, timeout)
    except AssertionError:
        raise AssertionError(f"workers {pids} did not all exit cleanly: {_events(app_dir)}") from None
    for pid in pids:
        own = [event for event in _events(app_dir) if int(event[1]) == pid]
        names = [event[0] for event in own]
        assert names[-3:] == ["worker_exit", "app_worker_exit", "atexit"], own  # config's, app's, then atexit
        assert own[-3][2] == own[-2][2] == reason, own


def _start(app_dir: Path, *args: str) -> tuple[Launcher, set[int]]:
    """The launcher, once each of its workers ran its post_worker_init hooks; their pids. No STATS call
    (it would count toward max_requests): the listeners queue what comes before a worker serves."""
    launcher = Launcher(app_dir, "-c", "hooks_conf.py", *args)
    try:
        count = int(launcher.wait_log(r"starting (\d+) worker").group(1))
        pids: set[int] = wait_until(lambda: len(ready := set(_pids(app_dir, "app_post_worker_init"))) == count
                                    and ready)
    except BaseException:
        launcher.close()
        raise
    return launcher, pids


@pytest.mark.slow
def test_hooks_run_where_and_when_documented_through_hup_ttou_and_term(app_dir: Path) -> None:
    launcher, first = _start(app_dir)
    try:
        master = launcher.master
        events = _events(app_dir)
        assert events[0] == ["on_starting", str(master), str(master)]
        assert events[1] == ["when_ready", str(master), "2"]
        forks = [event for event in events if event[0] == "pre_fork"]
        assert forks == [["pre_fork", str(master), "None", "1"], ["pre_fork", str(master), "None", "2"]]
        assert set(_pids(app_dir, "post_fork")) == first  # in each worker, after the fork
        assert all(event[2] == event[1] and event[3] == str(master)
                   for event in events if event[0] == "post_fork")
        assert set(_pids(app_dir, "post_worker_init")) == first  # the config file's, then the app's
        assert set(_pids(app_dir, "app_post_worker_init")) == first

        launcher.signal(signal.SIGHUP)  # reload: the old workers drain and exit
        second = launcher.wait_workers(2, exclude=first)
        _wait_exited(app_dir, first, "reload")
        assert ["on_reload", str(master), "1"] in _events(app_dir)

        launcher.signal(signal.SIGTTOU)  # one worker fewer
        (kept,) = launcher.wait_workers(1)
        _wait_exited(app_dir, second - {kept}, "shutdown")

        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30) == 0
        _wait_exited(app_dir, {kept}, "shutdown")
        assert [event for event in _events(app_dir) if event[0] != "master_atexit"][-1] == ["on_exit", str(master)]
        assert _pids(app_dir, "on_exit") == [master]
        # Every worker ran each exit hook once, and the master's own hooks ran only in the master.
        assert sorted(_pids(app_dir, "worker_exit")) == sorted(first | second)
        assert sorted(_pids(app_dir, "atexit")) == sorted(first | second)
        assert set(_pids(app_dir, "pre_fork")) == {master}
        assert set(_pids(app_dir, "master_atexit")) == {master}  # HUP re-read the file: registered twice
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_max_requests_recycle_runs_worker_exit_and_atexit(app_dir: Path) -> None:
    launcher, (first,) = _start(app_dir, "--workers", "1", "--max-requests", "3")
    try:
        caller = Caller(launcher.address)
        for i in range(3):
            assert caller.call(9, request_id=i)["data"]["pid"] == first
        _wait_exited(app_dir, {first}, "max_requests")
        assert launcher.wait_workers(1, exclude={first})
        caller.close()
    finally:
        launcher.close()


@pytest.mark.slow
def test_int_runs_worker_int_then_worker_exit_and_atexit(app_dir: Path) -> None:
    launcher, pids = _start(app_dir)
    try:
        launcher.signal(signal.SIGINT)
        assert launcher.wait_exit(30) == 0
        _wait_exited(app_dir, pids, "quit")
        assert sorted(_pids(app_dir, "worker_int")) == sorted(pids)
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_worker_stuck_past_timeout_runs_worker_abort_and_still_dies_of_sigabrt(app_dir: Path) -> None:
    launcher, (stuck,) = _start(app_dir, "--workers", "1", "--timeout", "1", "--blocking-time", "0")
    try:
        caller = Caller(launcher.address)
        with pytest.raises(Caller.MaybeExecutedError):
            caller.call(7, {"seconds": 8})  # spins the CPU: no heartbeat while it runs
        launcher.wait_log(rf"Worker \(pid:{stuck}\) was killed by SIGABRT")
        assert ["worker_abort", str(stuck), "abort"] in _events(app_dir)
        assert "Current thread" in launcher.output or "Thread 0x" in launcher.output  # the stack dump follows
        assert stuck not in _pids(app_dir, "worker_exit")  # killed: no clean exit
        assert launcher.wait_workers(1, exclude={stuck})
    finally:
        launcher.close()


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["on_starting", "when_ready"])
def test_a_failing_on_starting_or_when_ready_stops_the_master_with_its_traceback(app_dir: Path, hook: str) -> None:
    (app_dir / "bad_conf.py").write_text(f"def {hook}(server):\n    raise RuntimeError('no database')\n")
    argv = python_cmd("-m", "geventtcp", "serve", "opsapp", "-c", "bad_conf.py", "--bind", "127.0.0.1:0")
    done = subprocess.run(argv, cwd=app_dir, env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"hook {hook} ({hook}) failed" in done.stderr and "RuntimeError: no database" in done.stderr
    assert f"cannot start: hook {hook} failed" in done.stderr
    assert "booting worker" not in done.stderr


@pytest.mark.slow
def test_a_failing_worker_exit_is_logged_and_atexit_still_runs(app_dir: Path) -> None:
    (app_dir / "hooks_conf.py").write_text(CONFIG.replace(
        '_mark("worker_exit", os.getpid(), worker.exit_reason)',
        '_mark("worker_exit", os.getpid(), worker.exit_reason); raise RuntimeError("flush failed")'))
    launcher, pids = _start(app_dir, "--workers", "1")
    try:
        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30) == 0
        _wait_exited(app_dir, pids, "shutdown")
        assert "hook worker_exit (worker_exit) failed" in launcher.output
        assert "RuntimeError: flush failed" in launcher.output  # with its traceback
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_failing_post_worker_init_is_a_boot_error_that_halts_the_master(app_dir: Path) -> None:
    with open(app_dir / "opsapp.py", "a") as fh:
        fh.write("\n@registry.hook('post_worker_init')\ndef broken(worker):\n    raise RuntimeError('no pool')\n")
    launcher = Launcher(app_dir, "-c", "hooks_conf.py", "--workers", "1")
    try:
        assert launcher.wait_exit(60) == 3
        assert "hook post_worker_init (broken) failed" in launcher.output
        assert "RuntimeError: no pool" in launcher.output
        assert "worker failed to boot" in launcher.output
        # Each failed worker still ran its exit hooks and atexit (its reason: boot_error).
        booted = set(_pids(app_dir, "post_fork"))
        _wait_exited(app_dir, booted, "boot_error")
    finally:
        launcher.close()


@pytest.mark.slow
def test_failing_on_reload_pre_fork_and_on_exit_are_logged_and_the_server_goes_on(app_dir: Path) -> None:
    hooks = (("on_reload", "server"), ("pre_fork", "server, worker"), ("on_exit", "server"))
    failing = "".join(f"def {name}({args}):\n    raise RuntimeError('{name} broke')\n\n" for name, args in hooks)
    (app_dir / "failing_conf.py").write_text(failing)
    launcher = Launcher(app_dir, "-c", "failing_conf.py", "--workers", "1")
    try:
        (first,) = launcher.wait_workers(1)
        launcher.signal(signal.SIGHUP)
        (second,) = launcher.wait_workers(1, exclude={first})  # the reload went on, with a forked worker
        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30) == 0
        for name in ("on_reload", "pre_fork", "on_exit"):
            assert f"hook {name} ({name}) failed" in launcher.output, launcher.output
            assert f"RuntimeError: {name} broke" in launcher.output  # with its traceback
        assert launcher.output.count("hook pre_fork (pre_fork) failed") == 2  # each fork
    finally:
        launcher.close()
