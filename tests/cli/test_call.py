"""The ``call`` verb (and ``ping`` next to it), run as subprocesses against a real server."""

import json
import socket
import subprocess
import sys

import pytest

from tests.support.system import ROOT, env

pytestmark = pytest.mark.subprocess


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "geventtcp", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_call_prints_the_reply_data_as_json(app_process):
    result = cli("call", app_process.address, "1", '{"name": "x", "n": [1, 2]}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"name": "x", "n": [1, 2]}
    compact = cli("call", app_process.address, "1", '{"a": 1}', "--compact")
    assert compact.stdout == '{"a": 1}\n'


@pytest.mark.slow
def test_ping_uses_the_builtin_health_command(app_process):
    result = cli("ping", app_process.address, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pong"] is True
    same = cli("call", app_process.address, "-1", "--compact")
    assert same.returncode == 0 and json.loads(same.stdout)["pong"] is True


@pytest.mark.slow
def test_error_reply_goes_to_stderr_with_exit_1(app_process):
    result = cli("call", app_process.address, "3")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "error 500: internal error"
    unknown = cli("call", app_process.address, "999")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error 404:")


@pytest.mark.slow
def test_bad_params_exit_2(app_process):
    assert cli("call", app_process.address, "1", "{not json").returncode == 2
    assert cli("call", app_process.address, "1", "[1, 2]").returncode == 2
    assert cli("call", "127.0.0.1:notaport", "1").returncode == 2


def test_unreachable_server_exit_3():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        result = cli("call", f"127.0.0.1:{port}", "-1", "--timeout", "2")
    assert result.returncode == 3
    assert "refused" in result.stderr


@pytest.mark.slow
def test_no_reply_in_time_exit_5():
    with socket.socket() as s:  # listens (the kernel completes connects) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        result = cli("call", f"127.0.0.1:{s.getsockname()[1]}", "1", "{}", "--timeout", "0.5")
    assert result.returncode == 5
    assert "timeout" in result.stderr


@pytest.mark.slow
def test_timeout_is_sent_as_the_server_deadline(app_process):
    result = cli("call", app_process.address, "2", '{"seconds": 5}', "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stderr.startswith("error 504:")


@pytest.mark.slow
def test_meta_is_sent_and_error_details_are_printed(app_process):
    """A service that reads an API key or tenant from meta can be called from the command line, and
    an error's details (a 400's bad fields, a dependency's reason) are not dropped."""
    result = cli("call", app_process.address, "7", "--meta", '{"api_key": "k1", "request_id": "r-1"}', "--compact")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"api_key": "k1", "request_id": "r-1"}
    failed = cli("call", app_process.address, "6", '{"key": "cli-details", "after": 5}')
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.splitlines() == ["error 1014: try again", 'details: {"seen": 1}']
    assert cli("call", app_process.address, "7", "--meta", "[1]").returncode == 2
    assert cli("call", app_process.address, "7", "--meta", '{"Bad Key": "x"}').returncode == 2
