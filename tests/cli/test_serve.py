"""The command line and manage.py as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.launcher import wait_inflight
from tests.support.rawconn import RawConn
from tests.support.servers import CliServer
from tests.support.system import ROOT, python_cmd

pytestmark = pytest.mark.subprocess


@pytest.mark.slow
def test_python_m_geventtcp_serves_the_example_handlers() -> None:
    server = CliServer(python_cmd("-m", "geventtcp", "serve", "handlers", "--bind", "127.0.0.1:0"))
    try:
        with RawConn((server.host, server.port)) as c:
            assert c.call({"cmdid": 1, "params": {"x": 1}, "id": 1}) == {"code": 0, "cmdid": 1, "id": 1,
                                                                         "data": {"x": 1}}
            assert c.call({"cmdid": 3})["code"] == 500
            assert c.call(b'{"cmdid":10000,"timestamp":1700000000,"params":{"hello":"seed"}}\n') == {
                "code": 0, "cmdid": 10000, "data": {"received": True}}
    finally:
        server.proc.send_signal(signal.SIGTERM)
        output = server.rest_of_output()
    assert server.proc.returncode == 0
    assert "params: {'hello': 'seed'}" in output  # the seed handler's own logger
    assert "this handler always fails" in output  # traceback logged, not sent


@pytest.mark.slow
def test_monkey_patched_time_sleep_in_handlers_is_concurrent() -> None:
    server = CliServer(python_cmd("-m", "geventtcp", "serve", "handlers", "--bind", "127.0.0.1:0"))
    try:
        conns = [RawConn((server.host, server.port)) for _ in range(100)]
        start = time.monotonic()
        for i, c in enumerate(conns):
            c.send(json.dumps({"cmdid": 2, "id": i, "params": {"seconds": 0.2}}).encode() + b"\n")
        replies = [c.line() for c in conns]
        elapsed = time.monotonic() - start
        assert all(r["code"] == 0 for r in replies) and [r["id"] for r in replies] == list(range(100))
        assert elapsed < 5.0, f"100 handlers sleeping 0.2 s took {elapsed:.2f}s; serial would be 20 s"
        for c in conns:
            c.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_manage_py_takes_the_same_flags() -> None:
    server = CliServer(python_cmd("manage.py", "--bind", "127.0.0.1:0", "--log-level", "debug"))
    try:
        with RawConn((server.host, server.port)) as c:
            assert c.call({"cmdid": 1, "params": {"m": 1}})["data"] == {"m": 1}
            assert c.call({"cmdid": 2, "params": {"seconds": "x"}})["code"] == 400
    finally:
        server.stop()


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("geventtcp")
    assert script.exists(), "pip install -e . must install the geventtcp console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "serve" in out.stdout


@pytest.mark.slow
def test_duplicate_cmdid_fails_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "dupapp.py").write_text(textwrap.dedent("""
        from geventtcp import BaseHandler, urls

        @urls.handler(5)
        class A(BaseHandler):
            pass

        @urls.handler(5)
        class B(BaseHandler):
            pass
    """))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run(python_cmd("-m", "geventtcp", "serve", "dupapp", "--bind", "127.0.0.1:0"),
                         capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)
    assert out.returncode != 0
    assert "cmdid 5 is already registered" in out.stderr


def test_invalid_setting_exits_2_with_a_message() -> None:
    out = subprocess.run(python_cmd("-m", "geventtcp", "serve", "handlers", "--max-line-bytes", "lots"),
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2 and "max_line_bytes" in out.stderr


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_before_exit() -> None:
    server = CliServer(python_cmd("-m", "geventtcp", "serve", "handlers", "--bind", "127.0.0.1:0"))
    try:
        with RawConn((server.host, server.port)) as c:
            c.send(b'{"cmdid":2,"id":1,"params":{"seconds":2}}\n')
            # Signal only once the server reports the request running (else the first line is a goaway).
            wait_inflight((server.host, server.port), 2, 1)
            server.proc.send_signal(signal.SIGTERM)
            assert c.line() == {"code": 0, "cmdid": 2, "id": 1, "data": {"slept": 2}}
            assert c.line()["goaway"] == "shutdown"
        assert server.proc.wait(timeout=10) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_proxy_protocol_flags() -> None:
    """--proxy-protocol and --proxy-allow-from (comma-separated networks) from the command line and env."""
    out = subprocess.run(python_cmd("-m", "geventtcp", "serve", "handlers", "--proxy-protocol",
                                    "--proxy-allow-from", "10.0.0.0/8, 127.0.0.1", "--print-config"),
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GEVENTTCP_PROXY_PROTOCOL_TIMEOUT": "2"})
    assert out.returncode == 0, out.stderr
    shown = dict(line.split(None, 1) for line in out.stdout.splitlines())
    assert shown["proxy_protocol"] == "= True  # command line"
    assert shown["proxy_allow_from"] == "= ['10.0.0.0/8', '127.0.0.1']  # command line"
    assert shown["proxy_protocol_timeout"] == "= 2.0  # env GEVENTTCP_PROXY_PROTOCOL_TIMEOUT"
    bad = subprocess.run(python_cmd("-m", "geventtcp", "serve", "handlers", "--proxy-allow-from", "10.0.0.300"),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "proxy_allow_from (command line): invalid value" in bad.stderr
