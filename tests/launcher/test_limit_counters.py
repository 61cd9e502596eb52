"""Limit and security counters reach STATS summed over workers, and the Prometheus text (case 34)."""

from __future__ import annotations

import pytest

from geventtcp.launcher.metrics import LIMIT_COUNTERS, merge, prometheus_text
from tests.support.launcher import Launcher
from tests.support.rawconn import RawConn
from tests.support.system import ROOT, wait_until


@pytest.mark.slow
@pytest.mark.subprocess
def test_counters_are_summed_over_workers(tmp_path: object) -> None:
    launcher = Launcher(tmp_path, "--workers", "2", "--request-timeout", "0.3", "--auth-token", "t0ken",  # type: ignore[arg-type]
                        app="handlers", env={"PYTHONPATH": ROOT})
    try:
        wait_until(lambda: launcher.output.count("listening on") == 2, 15)  # STATS needs AUTH: watch the log
        for _ in range(4):  # spread over both workers by the kernel
            with RawConn(launcher.address) as conn:
                assert conn.call(-4, {"token": "wrong"})["code"] == 401
        for _ in range(3):
            with RawConn(launcher.address) as conn:
                conn.send(b'{"cmdid":1,')
                assert conn.line()["code"] == 408
                conn.expect_eof()

        def stats() -> dict[str, int] | None:
            with RawConn(launcher.address) as conn:
                assert conn.call(-4, {"token": "t0ken"})["code"] == 0
                data = conn.call(-3)["data"]
            got = {name: data.get(name, 0) for name, _ in LIMIT_COUNTERS}
            return got if got["auth_failures"] == 4 and got["slow_request_disconnections"] == 3 else None

        assert wait_until(stats, 30)
    finally:
        launcher.close()


def test_prometheus_text_has_every_limit_counter() -> None:
    snaps = [{"pid": 1, "commands": {}, "auth_failures": 2, "tls_failures": 1},
             {"pid": 2, "commands": {}, "auth_failures": 3, "write_timeout_disconnections": 4}]
    text = prometheus_text(snaps)
    assert "geventtcp_auth_failures_total 5" in text and "geventtcp_tls_failures_total 1" in text
    assert "geventtcp_write_timeout_disconnections_total 4" in text
    assert "geventtcp_slow_request_disconnections_total 0" in text
    assert "geventtcp_blank_lines_total 0" in text  # issue 10, item 3: blank lines are counted
    assert merge(snaps)["auth_failures"] == 5
