"""A short run of bench/soak.py: mixed hostile traffic, RSS and fds flat after warm-up (case 43, bounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.system import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_short_soak_is_flat() -> None:
    proc = subprocess.run([sys.executable, os.path.join("bench", "soak.py"), "--duration", "12", "--interval", "3",
                           "--clients", "10", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=100)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failures"] == 0
    counts = summary["counts"]
    assert counts["good"] > 5000
    assert min(counts.get(k, 0) for k in ("malformed", "oversized", "slow", "disconnect", "blank", "blocked_head",
                                          "poisoned")) > 20
    assert summary["rss_growth_pct"] < 10 and summary["fd_growth"] <= 16
