"""``--bind-file``: the launcher writes its bound addresses once every worker serves (no log scraping)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.apps import APP_SOURCE
from tests.support.launcher import Launcher
from tests.support.rawconn import call_once
from tests.support.system import ROOT, wait_until

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

#: The launcher app, importing slowly and leaving ``imported-PID`` behind once imported: a bind file
#: written before the workers serve would appear while fewer marker files exist than workers.
SLOW_APP = """
import os, time
time.sleep(0.5)
""" + APP_SOURCE.format(version="v1") + """
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imported-%d" % os.getpid()), "w").close()
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    return tmp_path


@pytest.mark.parametrize("workers", [1, 2])
def test_the_bind_file_names_the_address_once_every_worker_serves(app_dir: Path, workers: int) -> None:
    path = app_dir / "run" / "addresses"
    path.parent.mkdir()
    launcher = Launcher(app_dir, "--workers", str(workers), "--bind-file", str(path), app="slowapp")
    try:
        wait_until(path.exists, timeout=30)
        imported = len(list(app_dir.glob("imported-*")))  # counted as the file appeared
        host, port = launcher.address
        assert path.read_text() == f"{host}:{port}\n"
        assert imported == workers
        assert call_once((host, port), 1, {"x": 1}) == {"x": 1}
        assert sorted(os.listdir(path.parent)) == ["addresses"]  # the temporary file was renamed away
        launcher.signal(signal.SIGTERM)
        assert launcher.wait_exit(30) == 0
        assert not path.exists()  # removed on exit, as the pidfile is
    finally:
        launcher.close()


def test_a_dash_prints_the_addresses_to_stdout(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--bind", "127.0.0.1:0", "--bind-file", "-", app="slowapp")
    try:
        printed = launcher.wait_log(r"^127\.0\.0\.1:(\d+)$", timeout=30)
        assert int(printed.group(1)) == launcher.address[1]
        second = launcher.wait_log(r"^127\.0\.0\.1:(\d+)$", count=2, timeout=30)  # the second --bind
        assert second.group(1) != printed.group(1)
        assert len(list(app_dir.glob("imported-*"))) == 1
    finally:
        launcher.close()


def test_an_unwritable_bind_file_fails_the_start(tmp_path: Path) -> None:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    result = subprocess.run(
        [sys.executable, "-m", "geventtcp", "serve", "slowapp", "--bind", "127.0.0.1:0", "--bind-file",
         str(tmp_path / "missing" / "addresses")],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert result.returncode == 2
    assert "bind_file" in result.stderr and "missing or not writable" in result.stderr
    assert not list(tmp_path.glob("imported-*"))  # failed before any worker started
