"""The conformance vectors (conformance/vectors.json) played by their runner against the real server.

One server subprocess per group's settings, the runner as a subprocess too (as a third party would
run it), every case of the group required to pass. The runner itself is checked to catch a server
that answers wrongly, so a green run means the vectors were matched, not skipped.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import FakeServer
from tests.support.servers import CliServer
from tests.support.system import ROOT, python_cmd, wait_until

VECTORS = Path(ROOT) / "conformance" / "vectors.json"
GROUPS = json.loads(VECTORS.read_text(encoding="utf-8"))["groups"]

pytestmark = pytest.mark.subprocess


def run_vectors(address: str, *args: str) -> dict[str, Any]:
    """The runner as a subprocess, waited on cooperatively (a FakeServer in this process's hub answers
    meanwhile). Stdlib subprocess: gevent's would install libev's SIGCHLD watcher in this process,
    which reaps every child, so later tests' ``Popen.poll()`` would read their servers' status as 0."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(python_cmd(str(Path(ROOT) / "conformance" / "run.py"), address, "--json", *args),
                                stdout=out, text=True)
        wait_until(lambda: proc.poll() is not None, 120)
        out.seek(0)
        result: dict[str, Any] = json.loads(out.read())
    result["exit"] = proc.returncode
    return result


def flags(settings: dict[str, Any]) -> list[str]:
    """A group's settings as `geventtcp serve` options (every setting has a --dashed-name flag)."""
    return [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]


@pytest.mark.parametrize("group", GROUPS, ids=[group["name"] for group in GROUPS])
def test_the_server_passes_every_vector_of_the_group(group: dict[str, Any]) -> None:
    server = CliServer(python_cmd("-m", "geventtcp", "serve", "handlers", "--bind", "127.0.0.1:0",
                                  *flags(group.get("server", {}))))
    try:
        result = run_vectors(server.address, "--group", group["name"])
    finally:
        server.stop()
    failures = [f"{r['case']}: {r['error']}" for r in result["results"] if not r["passed"]]
    assert failures == []
    assert result["played"] == len(group["cases"]) and result["exit"] == 0


def test_every_case_names_the_rule_it_checks() -> None:
    names = [(group["name"], case["name"]) for group in GROUPS for case in group["cases"]]
    assert len(names) == len(set(names))
    assert all(case.get("rule") for group in GROUPS for case in group["cases"])


def test_the_runner_fails_a_server_that_answers_wrongly() -> None:
    # A server that answers every line with a success reply lacking the id: the runner must report
    # the cases that expect an id or an error code as failed, and exit non-zero.
    def answer_wrongly(fake: FakeServer, sock: Any, n: int) -> None:
        buf: list[bytes] = []
        while fake.read_line(sock, buf) is not None:
            sock.sendall(b'{"code":0,"cmdid":1,"data":{}}\n')

    fake = FakeServer(answer_wrongly)
    try:
        result = run_vectors(fake.address, "--group", "core", "--timeout", "1")
    finally:
        fake.close()
    failed = {r["case"] for r in result["results"] if not r["passed"]}
    assert {"echo-with-id", "invalid-json", "unknown-cmdid"} <= failed
    assert result["exit"] == 1
