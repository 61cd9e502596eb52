"""The blocking detector: a stuck hub is reported once per stall, naming the request that held it."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from geventtcp import Server
from geventtcp.server.blocking import BlockingDetector, enable_blocking_detector, request_in_stack
from tests.support.rawconn import RawConn
from tests.support.system import wait_until

THRESHOLD = 0.05


@pytest.fixture
def detector() -> Iterator[BlockingDetector]:
    found = enable_blocking_detector(THRESHOLD)
    assert found is not None
    yield found
    enable_blocking_detector(0)


def reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "geventtcp.blocking"]


@pytest.mark.slow
def test_a_spinning_handler_is_named_once_per_stall(serve: Callable[..., Server], detector: BlockingDetector,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    server = serve()
    with caplog.at_level(logging.WARNING, logger="geventtcp.blocking"), RawConn(server.address) as c:
        assert c.call(1, {"a": 1})["code"] == 0
        assert reports(caplog) == []  # an echo blocks nothing
        assert c.call(6, {"seconds": 0.4}, id=41)["data"] == "spun"
        wait_until(lambda: detector.stalls >= 1)
        assert c.call(6, {"seconds": 0.4}, id=42)["data"] == "spun"
        wait_until(lambda: detector.stalls >= 2)
    rows = reports(caplog)
    assert len(rows) == 2, rows  # one report per stall, not one per tick of an eight-tick spin
    for row, ident in zip(rows, (41, 42), strict=True):
        # ... and where: the module, file:line, function and source line of the spin.
        assert re.fullmatch(rf"event loop blocked for more than 0\.05s by cmdid 6 \(id {ident}, "
                            r"peer 127\.0\.0\.1:\d+\) in tests\.support\.apps \(\S+/tests/support/apps\.py:\d+, "
                            r"in _spin: (while time\.monotonic\(\) < end:|pass)\)", row), row


@pytest.mark.slow
def test_each_request_that_holds_one_stall_is_named(serve: Callable[..., Server], detector: BlockingDetector,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # One read, three lines, no hub turn in between: a single stall. The report made when it is
    # noticed names the request running then (id 2: it spins five thresholds, so a watcher slowed by
    # a loaded host still finds it running); the spin after it (id 3) held the loop four times
    # longer and must be named too, not hidden behind the first report.
    server = serve()
    with caplog.at_level(logging.WARNING, logger="geventtcp.blocking"), RawConn(server.address) as c:
        c.send(b'{"cmdid":1,"id":1,"params":{}}\n'
               b'{"cmdid":6,"id":2,"params":{"seconds":0.25}}\n'
               b'{"cmdid":6,"id":3,"params":{"seconds":1.0}}\n')
        assert [c.line()["id"] for _ in range(3)] == [1, 2, 3]
        wait_until(lambda: detector.stalls >= 2)
        assert c.call(1, {"after": 1})["code"] == 0  # the loop turned: the stall is over
    rows = reports(caplog)
    assert [re.search(r"\(id (\d+),", row).group(1) for row in rows] == ["2", "3"], rows  # type: ignore[union-attr]
    assert all("by cmdid 6 " in row for row in rows), rows


def test_only_the_servers_dispatch_frame_names_a_request() -> None:
    # An application's own ``_dispatch`` in its own ``connection.py`` holding a ``req`` is not the
    # server's dispatch frame: matching by name and file would report that object as the request.
    import sys

    from geventtcp.codec import get_codec
    from geventtcp.protocol import parse_request

    source = "def _dispatch(req):\n    return sys._getframe()\n"
    scope: dict[str, Any] = {"sys": sys}
    exec(compile(source, "/srv/myapp/connection.py", "exec"), scope)  # noqa: S102 - a look-alike frame
    req = parse_request(b'{"cmdid":1,"id":5,"params":{}}', get_codec("simplejson"), ("127.0.0.1", 1))
    assert request_in_stack(scope["_dispatch"](req)) is None


@pytest.mark.slow
def test_a_cooperative_sleep_is_no_stall(serve: Callable[..., Server], detector: BlockingDetector,
                                         caplog: pytest.LogCaptureFixture) -> None:
    server = serve()
    with caplog.at_level(logging.WARNING, logger="geventtcp.blocking"), RawConn(server.address) as c:
        assert c.call(2, {"seconds": 0.4})["code"] == 0
        # Positive control: the detector is alive and would have reported the sleep by now.
        assert c.call(6, {"seconds": 0.4}, id=7)["data"] == "spun"
        wait_until(lambda: detector.stalls >= 1)
    assert len(reports(caplog)) == 1 and "by cmdid 6 (id 7, " in reports(caplog)[0]


def test_a_stall_outside_any_handler_says_so(detector: BlockingDetector,
                                             caplog: pytest.LogCaptureFixture) -> None:
    import time
    with caplog.at_level(logging.DEBUG, logger="geventtcp.blocking"):
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            pass
        wait_until(lambda: detector.stalls >= 1)
    rows = reports(caplog)
    assert rows[0].startswith("event loop blocked for more than 0.05s by no running request"), rows
    assert "test_a_stall_outside_any_handler_says_so" in rows[1]  # debug level adds the stuck stack


def test_zero_turns_it_off_and_stop_silences_it(caplog: pytest.LogCaptureFixture) -> None:
    import time
    assert enable_blocking_detector(0) is None
    first = enable_blocking_detector(THRESHOLD)
    second = enable_blocking_detector(THRESHOLD)  # replaces the first: one report per stall, not two
    assert first is not None and second is not None and not first.running
    second.stop()
    stopped: Any = second
    with caplog.at_level(logging.WARNING, logger="geventtcp.blocking"):
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
    assert reports(caplog) == [] and stopped.stalls == 0
    enable_blocking_detector(0)
