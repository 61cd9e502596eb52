"""The server's hot-path stress harness (``hotpath_stress.py``) for 4 s against a ``geventtcp serve`` process."""

import pytest

from tests.stress.hotpath_stress import run
from tests.support.rawconn import RawConn
from tests.support.servers import CliServer
from tests.support.system import python_cmd, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.stress, pytest.mark.subprocess]


def test_stress_every_line_gets_one_reply_in_order() -> None:
    """Pipelined bursts, 1-byte writes, blocking handlers and 504s, half-closes, FIN/RST disconnects,
    from 60 connections for 4 s against a real server process; then the server logged no error."""
    server = CliServer(python_cmd("-m", "geventtcp", "serve", "handlers", "--bind", "127.0.0.1:0"))
    try:
        totals = run((server.host, server.port), connections=60, seconds=4.0, seed=7)
        assert totals.failures == [], totals.failures[:5]
        assert totals.replies > 1000 and totals.half_closes and totals.disconnects and totals.byte_splits
        assert totals.deadline_replies
        # A handler whose caller hung up mid-request may still be finishing when the clients are done:
        # it counts in flight until it returns, so wait for that (bounded) rather than read once.
        with RawConn((server.host, server.port)) as c:
            wait_until(lambda: c.call(-3)["data"]["inflight"] == 0, timeout=10.0)
    finally:
        server.proc.terminate()
        output = server.rest_of_output()
    assert "Traceback" not in output and " ERROR " not in output, output[-3000:]
