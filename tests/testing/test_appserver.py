"""geventtcp.testing.AppServer used directly: what a test can still read once the server has stopped."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from geventtcp.testing import AppServer

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

APP = textwrap.dedent('''
    import logging
    from geventtcp import Registry

    registry = Registry()
    registry.add(1, lambda request: "pong")

    @registry.hook("worker_exit")
    def goodbye(server, worker):
        logging.getLogger("svc").warning("worker_exit ran (%s)", worker.exit_reason)
''')


def test_output_after_stop_keeps_what_the_server_logged_while_stopping(tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(APP)
    server = AppServer("svc", workers=2, cwd=tmp_path)
    server.start()
    assert server.client.call(1) == "pong"
    assert server.stop() == 0
    # the worker_exit hooks log after TERM: a test of shutdown behaviour reads them after stop()
    assert server.output().count("worker_exit ran (shutdown)") == 2, server.output()
