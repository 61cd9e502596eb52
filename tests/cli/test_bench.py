"""``geventtcp bench`` as a subprocess against a real server subprocess: counts, percentiles, exit status."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from geventtcp.cli.loadgen import BenchConfig, BenchResult, request_line, request_lines
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


#: A handler that needs params: 400 without params.user, 1005 (NOT_FOUND) for an unknown user.
USERS_APP = '''
from geventtcp import HandlerError, Registry
from geventtcp.errors import Code

registry = Registry()

@registry.handler(20)
def get_user(request):
    user = request.params.get("user")
    if user is None:
        raise HandlerError("params.user is required")
    if user not in ("ann", "bob"):
        raise HandlerError("no user %r" % user, Code.NOT_FOUND)
    return {"user": user}
'''


@pytest.fixture(scope="module")
def users_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    app_dir = tmp_path_factory.mktemp("benchapp")
    (app_dir / "usersapp.py").write_text(USERS_APP)
    srv = CliServer(python_cmd("-m", "geventtcp", "serve", "usersapp", "--bind", "127.0.0.1:0"), cwd=app_dir)
    yield srv
    srv.stop()


@pytest.mark.slow
@pytest.mark.subprocess
def test_errors_are_counted_by_code_with_their_first_message(users_server: CliServer) -> None:
    """The issue's run: a handler that needs params, called without: 0 succeeded and it said nothing why."""
    address = f"127.0.0.1:{users_server.port}"
    done = bench(address, "-c", "2", "-n", "200", "--cmdid", "20", "--json")
    data = json.loads(done.stdout)
    assert done.returncode == 1 and data["requests"] == 0 and data["errors"] == 200
    assert data["errors_by_code"] == [{"code": 400, "name": "BAD_REQUEST", "count": 200,
                                       "first_msg": "params.user is required"}]
    table = bench(address, "-c", "1", "-n", "10", "--cmdid", "20")
    assert table.returncode == 1
    assert "errors     code 400 BAD_REQUEST: 10, first: params.user is required" in table.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_params_and_params_file_cycled(users_server: CliServer, tmp_path: Path) -> None:
    address = f"127.0.0.1:{users_server.port}"
    done = bench(address, "-c", "2", "-P", "4", "-n", "300", "--cmdid", "20", "--params", '{"user": "ann"}',
                 "--meta", '{"trace": "t-1"}', "--json")  # the server ignores a field it does not know
    data = json.loads(done.stdout)
    assert done.returncode == 0 and data["requests"] == 300 and data["errors_by_code"] == []
    assert data["config"]["meta"] == {"trace": "t-1"}
    params_file = tmp_path / "params.jsonl"
    params_file.write_text('{"user": "ann"}\n\n{"user": "nobody"}\n{"user": "bob"}\n')  # blank lines skipped
    done = bench(address, "-c", "1", "-n", "30", "--cmdid", "20", "--params-file", str(params_file), "--json")
    data = json.loads(done.stdout)
    assert done.returncode == 1 and data["requests"] == 20 and data["errors"] == 10  # one in three
    assert data["errors_by_code"] == [{"code": 1005, "name": "NOT_FOUND", "count": 10,
                                       "first_msg": "no user 'nobody'"}]
    assert "3 objects, cycled" in data["config"]["params"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_meta_and_params_are_in_every_request_line(tmp_path: Path) -> None:
    """What goes on the wire, read by a listener that answers every line with code 0."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as reader:
            for line in reader:
                received.append(line)
                conn.sendall(b'{"code":0,"cmdid":7,"data":null}\n')

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        done = bench(f"127.0.0.1:{listener.getsockname()[1]}", "-c", "1", "-n", "4", "--cmdid", "7",
                     "--params", '{"user": "ann"}', "--meta", '{"trace": "t-1", "tenant": 3}')
        assert done.returncode == 0, done.stdout + done.stderr
        thread.join(timeout=10)
    finally:
        listener.close()
    assert [json.loads(line) for line in received] == [
        {"cmdid": 7, "timestamp": 0, "params": {"user": "ann"}, "meta": {"trace": "t-1", "tenant": 3}}] * 4


@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_params_and_meta_are_refused_before_connecting(tmp_path: Path) -> None:
    done = bench("127.0.0.1:1", "--params", "[1]")
    assert done.returncode == 2 and "--params must be a JSON object, not list" in done.stderr
    done = bench("127.0.0.1:1", "--meta", "{")
    assert done.returncode == 2 and "--meta is not JSON" in done.stderr
    (tmp_path / "p.jsonl").write_text('{"a": 1}\nnope\n')
    done = bench("127.0.0.1:1", "--params-file", str(tmp_path / "p.jsonl"))
    assert done.returncode == 2 and "p.jsonl line 2 is not JSON" in done.stderr


def test_request_lines_default_and_with_params_and_meta() -> None:
    cfg = BenchConfig(host="h", port=1, cmdid=5, payload_size=3)
    assert request_lines(cfg) == [request_line(5, 3)]
    cfg.meta = {"m": 1}
    assert request_lines(cfg) == [b'{"cmdid":5,"timestamp":0,"params":{"data":"xxx"},"meta":{"m":1}}\n']
    cfg.params, cfg.meta = [{"a": 1}, {"b": "\n"}], None
    assert request_lines(cfg) == [b'{"cmdid":5,"timestamp":0,"params":{"a":1}}\n',
                                  b'{"cmdid":5,"timestamp":0,"params":{"b":"\\n"}}\n']
