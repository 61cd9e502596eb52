"""The client verbs of the command line against a TLS + AUTH server (``--ca-certs``, ``--auth-token-file``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.certs import make_pki
from tests.support.launcher import Launcher
from tests.support.system import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "GEVENTTCP_AUTH_TOKEN"}
    return subprocess.run([sys.executable, "-m", "geventtcp", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**environ, **(env or {})})


def test_call_list_ping_over_tls_with_auth(tmp_path: Path) -> None:
    pki = make_pki(str(tmp_path))
    token = tmp_path / "token"
    token.write_text("cli-secret\n")
    launcher = Launcher(tmp_path, "--certfile", pki.server_cert, "--keyfile", pki.server_key,
                        "--auth-token-file", str(token), app="handlers", env={"PYTHONPATH": ROOT})
    try:
        address = f"127.0.0.1:{launcher.address[1]}"
        tls = ("--ca-certs", pki.ca, "--server-hostname", "localhost")
        ok = run("call", address, "1", '{"a": 1}', *tls, "--auth-token-file", str(token), "--compact")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"a": 1}
        via_env = run("list", address, *tls, "--json", env={"GEVENTTCP_AUTH_TOKEN": "cli-secret"})
        assert via_env.returncode == 0, via_env.stderr
        assert any(c["cmdid"] == 1 for c in json.loads(via_env.stdout))
        no_token = run("call", address, "1", *tls)
        assert no_token.returncode == 1 and "401" in no_token.stderr
        assert run("ping", address, *tls).returncode == 0  # PING needs no secret (health checks)
        unverified = run("ping", address, "--tls")  # our test CA is not a system CA: refused
        assert unverified.returncode != 0 and "certificate verify failed" in unverified.stderr.lower()
    finally:
        launcher.close()
