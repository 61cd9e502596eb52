"""``geventtcp bench`` as a subprocess against a real server subprocess: counts, percentiles, exit status."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from geventtcp.cli.loadgen import BenchResult, request_line
from tests.support.servers import CliServer
from tests.support.system import ROOT, python_cmd


@pytest.fixture(scope="module")
def server() -> Iterator[CliServer]:
    srv = CliServer(python_cmd("-m", "geventtcp", "serve", "handlers", "--bind", "127.0.0.1:0"))
    yield srv
    srv.stop()


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(python_cmd("-m", "geventtcp", "bench", *args), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.subprocess
def test_pipelined_run_from_two_processes_reports_json(server: CliServer) -> None:
    done = bench(f"127.0.0.1:{server.port}", "-c", "4", "-P", "8", "-d", "1", "-p", "2", "-s", "100", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["requests"] > 500 and data["errors"] == 0 and data["failures"] == []
    assert 0.8 < data["seconds"] < 3
    lat = data["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert data["config"]["processes"] == 2 and data["config"]["pipeline"] == 8
    assert done.stderr == ""  # no progress line when stderr is not a terminal


@pytest.mark.slow
@pytest.mark.subprocess
def test_request_count_and_progress_line(server: CliServer) -> None:
    done = bench(f"127.0.0.1:{server.port}", "-c", "3", "-n", "3000", "-d", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "requests   3000 in" in done.stdout and "errors 0" in done.stdout
    assert "req/s" in done.stdout and "p99" in done.stdout
    done = bench(f"127.0.0.1:{server.port}", "-c", "2", "-d", "1.2", "--progress")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replies" in done.stderr and "req/s" in done.stderr  # the live line


@pytest.mark.slow
@pytest.mark.subprocess
def test_error_replies_make_a_failing_exit_status(server: CliServer) -> None:
    done = bench(f"127.0.0.1:{server.port}", "-c", "2", "-n", "200", "--cmdid", "99999", "--json")  # 404s
    data = json.loads(done.stdout)
    assert done.returncode == 1
    assert data["requests"] == 0 and data["errors"] == 200
    assert data["latency_ms"]["p50"] > 0  # latency covers error replies too


@pytest.mark.slow
@pytest.mark.subprocess
def test_unreachable_server_and_bad_address() -> None:
    done = bench("127.0.0.1:1", "-c", "1", "-d", "0.5", "--json")
    assert done.returncode == 1 and "connect" in json.loads(done.stdout)["failures"][0]
    done = bench("unix:/tmp/x.sock")
    assert done.returncode == 2 and "HOST:PORT" in done.stderr


@pytest.mark.slow
def test_histogram_percentiles() -> None:
    result = BenchResult(completed=100, seconds=2.0)
    for us in range(1, 101):
        result.hist[us * 10] += 1
    assert result.rps == 50
    assert result.percentile(0.5) == 0.5 and result.percentile(0.99) == 0.99
    assert result.extreme(last=False) == 0.01 and result.extreme(last=True) == 1.0
    assert request_line(7, 3) == b'{"cmdid":7,"timestamp":0,"params":{"data":"xxx"}}\n'
