"""The application's own logging under the launcher: the same handler as geventtcp's (time, pid, level,
--log-file, USR1 reopen), and --log-config applied in the workers after the application is imported."""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
from pathlib import Path

import pytest

from tests.support.launcher import Launcher
from tests.support.rawconn import call_once
from tests.support.system import wait_until

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

#: An application that logs with plain ``logging.getLogger(__name__)`` and defines a filter class
#: a dictConfig names; it says (on stdout) which process imported it.
LOGAPP = textwrap.dedent('''
    import logging
    import os

    from geventtcp import Registry

    print("logapp imported in pid %d" % os.getpid(), flush=True)
    log = logging.getLogger("logapp")
    registry = Registry()

    class TenantFilter(logging.Filter):
        def filter(self, record):
            record.tenant = "tenant-%d" % os.getpid()
            return True

    @registry.handler(1)
    def say(request):
        tag = request.params["tag"]
        log.debug("debug %s", tag)
        log.info("info %s", tag)
        log.warning("warning %s", tag)
        return os.getpid()
''')


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "logapp.py").write_text(LOGAPP)
    return tmp_path


def _lines(path: Path, text: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if text in line] if path.exists() else []


def test_app_logs_land_in_the_log_file_with_time_pid_level_and_follow_usr1(app_dir: Path) -> None:
    log_file = app_dir / "server.log"
    launcher = Launcher(app_dir, "--workers", "1", "--log-file", str(log_file), app="logapp", log_path=log_file)
    try:
        launcher.wait_workers(1)
        pid = call_once(launcher.address, 1, {"tag": "one"})
        wait_until(lambda: _lines(log_file, "warning one"))
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
        assert re.fullmatch(rf"{stamp} \[{pid}\] INFO logapp: info one", _lines(log_file, "info one")[0])
        assert re.fullmatch(rf"{stamp} \[{pid}\] WARNING logapp: warning one", _lines(log_file, "warning one")[0])
        assert not _lines(log_file, "debug one")  # app_log_level defaults to info
        assert len(_lines(log_file, "warning one")) == 1  # written once, not also by logging.lastResort
        rotated = app_dir / "server.log.1"
        os.rename(log_file, rotated)  # logrotate moves the file...
        launcher.signal(signal.SIGUSR1)  # ...and asks for a reopen: master and worker reopen
        wait_until(lambda: len(_lines(log_file, "log files reopened")) == 2)
        assert call_once(launcher.address, 1, {"tag": "two"}) == pid
        wait_until(lambda: _lines(log_file, "warning two"))
        assert re.fullmatch(rf"{stamp} \[{pid}\] INFO logapp: info two", _lines(log_file, "info two")[0])
        assert not _lines(rotated, " two")
    finally:
        launcher.close()
    assert "logapp:" not in launcher.lines[-1]  # the process's stderr: nothing went to logging.lastResort


def _tenant_config(app_dir: Path, filter_factory: str) -> Path:
    path = app_dir / "logging.json"
    path.write_text(json.dumps({
        "filters": {"tenant": {"()": filter_factory}},
        "formatters": {"tenant": {"format": "%(tenant)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"tenant": {"class": "logging.FileHandler", "filename": str(app_dir / "tenant.log"),
                                "formatter": "tenant", "filters": ["tenant"]}},
        "loggers": {"logapp": {"handlers": ["tenant"], "level": "INFO", "propagate": False}},
    }))
    return path


def test_log_config_naming_an_application_filter_is_applied_in_each_worker(app_dir: Path) -> None:
    config = _tenant_config(app_dir, "logapp.TenantFilter")
    launcher = Launcher(app_dir, "--workers", "2", "--log-config", str(config), app="logapp")
    try:
        launcher.wait_workers(2)
        pids: set[int] = set()
        tag = iter(range(1000))

        def both_workers_answered() -> bool:
            pids.add(call_once(launcher.address, 1, {"tag": f"t{next(tag)}"}))  # a new connection each time
            return len(pids) == 2

        wait_until(both_workers_answered, timeout=30)
        log_file = app_dir / "tenant.log"
        wait_until(lambda: all(_lines(log_file, f"tenant-{p} WARNING logapp: warning t") for p in pids))
        for pid in pids:
            assert _lines(log_file, f"tenant-{pid} INFO logapp: info t")
        imported = {int(m) for m in re.findall(r"logapp imported in pid (\d+)", launcher.output)}
        assert imported == pids and launcher.master not in imported  # the master never imported the app
    finally:
        launcher.close()


def test_a_log_config_that_cannot_be_applied_fails_the_worker_boot_with_its_cause(app_dir: Path) -> None:
    config = _tenant_config(app_dir, "logappz.TenantFilter")  # a misspelt module
    launcher = Launcher(app_dir, "--workers", "1", "--log-config", str(config), app="logapp")
    try:
        assert launcher.wait_exit(60) == 3  # three boot failures in a row halt the server
        assert "Unable to configure filter 'tenant'" in launcher.output
        assert "No module named 'logappz'" in launcher.output  # the cause, not only dictConfig's summary
    finally:
        launcher.close()
