"""The client stress harness (``client_stress.py``) for 8 s against the client app's server process."""

import ast
import subprocess
import sys

import pytest

from tests.support.system import ROOT, env

pytestmark = [pytest.mark.slow, pytest.mark.stress, pytest.mark.subprocess]



def test_stress_threads_and_greenlets_share_one_client(app_process):
    """8 threads + 100 greenlets, random timeouts (some below a sleeping handler's), kills and
    gevent.Timeouts, for 8 s: every reply the caller's own, no call late by more than 0.5 s."""
    result = subprocess.run([sys.executable, "-m", "tests.stress.client_stress", app_process.address, "8"], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RESULT PASS" in result.stdout
    stats = ast.literal_eval(result.stdout.splitlines()[-2])  # the counters: only real work counts as a pass
    assert stats["ok"] > 500 and stats["timeout"] > 100 and stats["kills"] > 100, stats
