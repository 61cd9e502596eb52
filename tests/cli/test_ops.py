"""Operations from the command line: ping/list/stats verbs, --print-config precedence, --check-config, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
from gevent import socket

from geventtcp.config import render_markdown
from geventtcp.launcher.metrics_endpoint import SCRAPE_TIMEOUT
from tests.support.apps import write_app
from tests.support.launcher import Launcher
from tests.support.rawconn import call_once
from tests.support.servers import CliServer
from tests.support.system import ROOT, non_loopback_ip, wait_until

pytestmark = pytest.mark.subprocess


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_app(tmp_path)
    return tmp_path


def _cli(*args: str, cwd: Path | str = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GEVENTTCP_")}
    environ["PYTHONPATH"] = f"{cwd}{os.pathsep}{ROOT}"
    return subprocess.run([sys.executable, "-m", "geventtcp", *args], capture_output=True, text=True, timeout=60,
                          cwd=str(cwd), env={**environ, **(env or {})})


@pytest.mark.slow
def test_ping_list_and_stats_verbs_against_a_two_worker_server(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2")
    try:
        pids = launcher.wait_workers(2)
        address = f"{launcher.address[0]}:{launcher.address[1]}"
        for _ in range(5):
            call_once(launcher.address, 1, {"n": 1})
        ping = _cli("ping", address)
        assert ping.returncode == 0 and "pong from pid" in ping.stdout and "draining: False" in ping.stdout
        listing = _cli("list", address)
        assert listing.returncode == 0
        assert "       1  opsapp.echo (idempotent)" in listing.stdout and "Reply with the params." in listing.stdout
        assert "       7  opsapp.spin\n" in listing.stdout

        def echo_row() -> list[str] | None:  # other workers' numbers are up to one heartbeat (1 s) old
            stats = _cli("stats", address)
            assert stats.returncode == 0, stats.stderr
            # No row yet when the echoes all went to the other worker and its snapshot predates them.
            row = next((line.split() for line in stats.stdout.splitlines() if line.split()[:1] == ["1"]), None)
            return row if row is not None and row[1] == "5" else None

        row = wait_until(echo_row, 60, 0.2)  # each try starts a CLI process: slow on a loaded host
        assert row[2] == "0"  # count 5, errors 0, summed over both workers
        stats = _cli("stats", address)
        assert {int(line.split()[0]) for line in stats.stdout.splitlines()[-2:]} == pids
    finally:
        launcher.close()
    gone = _cli("stats", address, "--timeout", "1")
    assert gone.returncode == 1 and "Connection refused" in gone.stderr


@pytest.mark.slow
def test_metrics_endpoint_serves_prometheus_text_aggregated_over_workers(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2", "--metrics-bind", "127.0.0.1:0")
    try:
        host, _, port = launcher.wait_log(r"metrics on http://(\S+)/metrics").group(1).rpartition(":")
        launcher.wait_workers(2)
        for _ in range(4):
            call_once(launcher.address, 1, {})
        call_once(launcher.address, 9, {})

        def scrape() -> str:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            head, _, body = data.decode().partition("\r\n\r\n")
            assert head.startswith("HTTP/1.0 200 OK") and "text/plain; version=0.0.4" in head
            return body

        body = wait_until(lambda: (b := scrape()) and 'geventtcp_requests_total{cmdid="1"} 4' in b and b, 30)
        assert 'geventtcp_requests_total{cmdid="9"} 1' in body
        assert 'geventtcp_request_duration_seconds_count{cmdid="1"} 4' in body
        assert 'geventtcp_request_duration_seconds_bucket{cmdid="1",le="+Inf"} 4' in body
        assert "geventtcp_workers 2" in body
        assert body.count("geventtcp_worker_uptime_seconds{pid=") == 2
    finally:
        launcher.close()


def _metrics_address(launcher: Launcher) -> tuple[str, int]:
    host, _, port = launcher.wait_log(r"metrics on http://(\S+)/metrics").group(1).rpartition(":")
    return host, int(port)


def _scrape(address: tuple[str, int], source: str | None = None) -> str:
    """One HTTP/1.0 scrape; the whole response."""
    with socket.create_connection(address, timeout=5, source_address=(source, 0) if source else None) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


@pytest.mark.slow
def test_a_trickling_metrics_client_does_not_stop_the_master_supervising(app_dir: Path) -> None:
    launcher = Launcher(app_dir, "--workers", "2", "--metrics-bind", "127.0.0.1:0")
    try:
        address = _metrics_address(launcher)
        pids = launcher.wait_workers(2)
        trickler = socket.create_connection(address, timeout=30)
        sent = [0]
        closed_after: list[float] = []
        start = time.monotonic()

        def trickle() -> None:  # one byte of a never-ending header every 0.5 s, until the master hangs up
            try:
                while True:
                    trickler.sendall(b"x")
                    sent[0] += 1
                    gevent.sleep(0.5)
            except OSError:
                closed_after.append(time.monotonic() - start)

        trickling = gevent.spawn(trickle)
        try:
            wait_until(lambda: sent[0] >= 3, 10)  # the master has had the connection for a second
            # A normal scrape is answered while the trickler is connected (checked first: under load
            # the worker's replacement below can outlast the trickler's 5 s).
            response = _scrape(address)
            assert not closed_after
            assert response.startswith("HTTP/1.0 200 OK") and "geventtcp_workers 2" in response
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            # Reaped and replaced as without the trickler (the master's loop turns every second at most).
            launcher.wait_log(rf"Worker \(pid:{victim}\) was sent SIGKILL", timeout=5)
            launcher.wait_workers(2, exclude={victim}, timeout=15)
            assert time.monotonic() - killed < 15
            # The trickler's whole scrape is bounded: the master (and no worker forked meanwhile)
            # holds it past the deadline; its next sends fail.
            wait_until(lambda: closed_after, 20)
            assert closed_after[0] < SCRAPE_TIMEOUT + 5
        finally:
            trickling.kill()
            trickler.close()
    finally:
        launcher.close()


@pytest.mark.slow
def test_protected_mode_applies_to_the_metrics_listener(app_dir: Path) -> None:
    public = ("serve", "opsapp", "--bind", "127.0.0.1:0", "--metrics-bind", "0.0.0.0:0")
    served = _cli(*public, cwd=app_dir)
    assert served.returncode == 2 and "protected mode" in served.stderr and "0.0.0.0" in served.stderr
    checked = _cli(*public, "--check-config", cwd=app_dir)
    assert checked.returncode == 1 and "protected mode" in checked.stderr
    # A token guards the protocol, not scrapes: it does not open the metrics listener.
    tokened = _cli(*public, "--auth-token", "s3cret", "--check-config", cwd=app_dir)
    assert tokened.returncode == 1 and "metrics" in tokened.stderr
    assert _cli(*public, "--no-protected-mode", "--check-config", cwd=app_dir).returncode == 0
    # A loopback bind reached from a non-loopback source (port forwarding) is answered 403.
    source = non_loopback_ip()
    assert source is not None, "no non-loopback IPv4 address on this host"
    launcher = Launcher(app_dir, "--metrics-bind", "127.0.0.1:0")
    try:
        address = _metrics_address(launcher)
        launcher.wait_workers(1)
        assert _scrape(address, source).startswith("HTTP/1.0 403 Forbidden")
        assert _scrape(address).startswith("HTTP/1.0 200 OK")
    finally:
        launcher.close()
    launcher = Launcher(app_dir, "--metrics-bind", "127.0.0.1:0", "--no-protected-mode")
    try:
        launcher.wait_workers(1)
        assert _scrape(_metrics_address(launcher), source).startswith("HTTP/1.0 200 OK")
    finally:
        launcher.close()


@pytest.mark.slow
def test_print_config_shows_values_and_sources_in_precedence_order(tmp_path: Path) -> None:
    (tmp_path / "geventtcp.conf.py").write_text("workers = 3\nmax_requests = 100\ntimeout = 5\nbacklog = 64\n")
    out = _cli("serve", "handlers", "-c", str(tmp_path / "geventtcp.conf.py"), "--max-requests", "300",
               "--print-config", env={"GEVENTTCP_MAX_REQUESTS": "200", "GEVENTTCP_TIMEOUT": "7"})
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert rows["workers"].endswith("= 3  # file " + str(tmp_path / "geventtcp.conf.py"))  # file > default
    assert rows["timeout"].endswith("= 7.0  # env GEVENTTCP_TIMEOUT")  # env > file
    assert rows["max_requests"].endswith("= 300  # command line")  # CLI > env > file
    assert rows["graceful_timeout"].endswith("= 30.0  # default")
    secret = _cli("serve", "handlers", "--print-config", env={"GEVENTTCP_AUTH_TOKEN": "s3cret-value"})
    assert "s3cret-value" not in secret.stdout and "auth_token" in secret.stdout and "<hidden>" in secret.stdout
    toml = tmp_path / "geventtcp.toml"
    toml.write_text('[geventtcp]\nworkers = "auto"\nbind = ["127.0.0.1:9001", "unix:/tmp/x.sock"]\n')
    out = _cli("serve", "handlers", "-c", str(toml), "--print-config")
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "['127.0.0.1:9001', 'unix:/tmp/x.sock']" in rows["bind"] and rows["workers"].startswith("workers")
    assert "= 0  # file" in rows["workers"]  # auto: one per CPU


@pytest.mark.slow
def test_check_config_loads_the_app_and_reports(app_dir: Path) -> None:
    good = _cli("serve", "opsapp", "--check-config", cwd=app_dir)
    assert good.returncode == 0 and "opsapp registers 4 command(s)" in good.stdout
    (app_dir / "badapp.py").write_text("import no_such_module_here\n")
    bad = _cli("serve", "badapp", "--check-config", cwd=app_dir)
    assert bad.returncode == 1 and "no_such_module_here" in bad.stderr
    invalid = _cli("serve", "opsapp", "--check-config", "--max-requests", "many", cwd=app_dir)
    assert invalid.returncode == 1 and "max_requests" in invalid.stderr
    log_config = _cli("serve", "opsapp", "--check-config", "--log-config", str(app_dir / "nope.json"), cwd=app_dir)
    assert log_config.returncode == 1 and "nope.json" in log_config.stderr


@pytest.mark.slow
def test_check_config_applies_the_security_checks_serve_applies(app_dir: Path, tmp_path: Path) -> None:
    # Protected mode: serve refuses a wildcard bind without auth (exit 2); --check-config must say "not fine".
    wildcard = ("serve", "opsapp", "--bind", "0.0.0.0:0")
    served = _cli(*wildcard, cwd=app_dir)
    assert served.returncode == 2 and "protected mode" in served.stderr
    checked = _cli(*wildcard, "--check-config", cwd=app_dir)
    assert checked.returncode == 1 and "protected mode" in checked.stderr and "OK" not in checked.stdout
    assert _cli("serve", "opsapp", "--bind", "[::]:0", "--check-config", cwd=app_dir).returncode == 1
    # What makes the same bind acceptable to serve makes it acceptable to the check.
    for remedy in (("--auth-token", "s3cret"), ("--no-protected-mode",)):
        ok = _cli(*wildcard, *remedy, "--check-config", cwd=app_dir)
        assert ok.returncode == 0 and "configuration OK" in ok.stdout, ok.stderr
    assert _cli("serve", "opsapp", "--bind", "localhost:0", "--check-config", cwd=app_dir).returncode == 0
    # Auth and TLS settings serve would reject.
    (tmp_path / "empty-token").write_text("\n")
    empty = _cli("serve", "opsapp", "--auth-token-file", str(tmp_path / "empty-token"), "--check-config", cwd=app_dir)
    assert empty.returncode == 1 and "is empty" in empty.stderr
    missing_cert = _cli("serve", "opsapp", "--certfile", str(tmp_path / "nope.pem"), "--check-config", cwd=app_dir)
    assert missing_cert.returncode == 1 and "nope.pem" in missing_cert.stderr
    orphan_key = _cli("serve", "opsapp", "--keyfile", str(tmp_path / "k.pem"), "--check-config", cwd=app_dir)
    assert orphan_key.returncode == 1 and "need certfile" in orphan_key.stderr


@pytest.mark.slow
def test_settings_verb_prints_the_readme_table() -> None:
    out = _cli("settings", "--markdown")
    assert out.returncode == 0 and out.stdout.strip() == render_markdown().strip()
    assert "--max-connection-age" in _cli("settings").stdout


@pytest.mark.slow
def test_check_config_refuses_unknown_and_gunicorn_only_names_and_lists_the_hooks(app_dir: Path) -> None:
    (app_dir / "typo.py").write_text("worker = 4\n")
    typo = _cli("serve", "opsapp", "-c", "typo.py", "--check-config", cwd=app_dir)
    assert typo.returncode == 1 and "unknown setting(s) in typo.py: worker (did you mean 'workers'?)" in typo.stderr
    (app_dir / "gunicorn.conf.py").write_text(
        "worker_class = 'gevent'\ndef post_fork(server, worker):\n    pass\ndef pre_request(worker, req):\n    pass\n"
        "def nworkers_changed(server, new_value, old_value):\n    pass\ndef ssl_context(config, default):\n    pass\n")
    gunicorn = _cli("serve", "opsapp", "-c", "gunicorn.conf.py", "--check-config", cwd=app_dir)
    assert gunicorn.returncode == 1 and "OK" not in gunicorn.stdout
    assert ("gunicorn setting(s) or hook(s) geventtcp does not have: nworkers_changed, pre_request, ssl_context, "
            "worker_class") in gunicorn.stderr
    served = _cli("serve", "opsapp", "-c", "gunicorn.conf.py", cwd=app_dir)  # serve refuses it the same way
    assert served.returncode == 2 and "pre_request" in served.stderr
    (app_dir / "hooks.py").write_text("def post_fork(server, worker):\n    pass\n")
    with open(app_dir / "opsapp.py", "a") as fh:
        fh.write("\n@registry.hook('worker_exit')\ndef bye(server, worker):\n    pass\n")
    ok = _cli("serve", "opsapp", "-c", "hooks.py", "--check-config", cwd=app_dir)
    assert ok.returncode == 0, ok.stderr
    assert "hooks: post_fork (config file), worker_exit (application) x1" in ok.stdout
    printed = _cli("serve", "opsapp", "-c", "hooks.py", "--print-config", cwd=app_dir)
    assert re.search(r"^post_fork += post_fork  # hook, file hooks.py$", printed.stdout, re.M), printed.stdout


PARAMS_APP = '''
import dataclasses
from geventtcp import urls

@dataclasses.dataclass
class Item:
    sku: str
    qty: int = 1

@dataclasses.dataclass
class Order:
    """An order to place."""
    customer: int
    items: list[Item]
    note: str | None = None

@urls.handler(30, params=Order)
def place(request):
    """Place an order."""
    return sum(item.qty for item in request.params.items)
'''


@pytest.mark.slow
def test_list_verb_shows_params(tmp_path: Path) -> None:
    (tmp_path / "paramsapp.py").write_text(PARAMS_APP)
    server = CliServer([sys.executable, "-m", "geventtcp", "serve", "paramsapp", "--bind", "127.0.0.1:0"],
                       cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    try:
        listing = _cli("list", server.address)
        assert listing.returncode == 0, listing.stderr
        assert "      30  paramsapp.place\n          Place an order.\n" \
               "          params: Order {customer, items, note?}\n" in listing.stdout
        as_json = json.loads(_cli("list", server.address, "--json").stdout)
        [place] = [item for item in as_json if item["cmdid"] == 30]
        assert place["params"]["$defs"]["Item"]["required"] == ["sku"]
    finally:
        server.stop()
