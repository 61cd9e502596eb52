"""The atheris harness runs clean for a short smoke run (the long run is documented in fuzz/)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.system import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_atheris_smoke_run(tmp_path: object) -> None:
    corpus = os.path.join(str(tmp_path), "corpus")  # libFuzzer writes new inputs to the first directory
    os.mkdir(corpus)
    proc = subprocess.run(
        [sys.executable, os.path.join("fuzz", "fuzz_protocol.py"), "-runs=5000", "-timeout=5",
         f"-artifact_prefix={tmp_path}/", corpus, os.path.join("fuzz", "seeds")],
        cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 5000 runs" in proc.stderr
