"""Log records written inside a request carry its cmdid and request id (inline and handed-off handlers,
the server's own records for the request); the text and JSON formats; ``--log-format json`` in a real
``geventtcp serve``."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from geventtcp import Registry, Server
from geventtcp.client.client import Client
from geventtcp.log import JsonFormatter, RequestFilter, TextFormatter, current_request
from tests.support.servers import CliServer, addr
from tests.support.system import wait_until

app_log = logging.getLogger("tests.request_logs")


def inline(request: Any) -> Any:
    app_log.info("inline handler")
    return current_request() is request


def handed_off(request: Any) -> Any:
    gevent.sleep(0.01)  # the hub runs: the request is handed off to this greenlet
    app_log.info("after a handoff")
    return True


def spawns(request: Any) -> Any:
    gevent.spawn(app_log.info, "in a greenlet the handler started").join()
    return True


def fails(request: Any) -> Any:
    raise RuntimeError("broken")


@pytest.fixture
def logged(serve: Callable[..., Server]) -> Iterator[tuple[io.StringIO, str]]:
    """A server of the four handlers; the records of the app's and the server's loggers, as JSON lines."""
    registry = Registry()
    for cmdid, fn in enumerate((inline, handed_off, spawns, fails), 1):
        registry.add(cmdid, fn)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    loggers = [app_log, logging.getLogger("geventtcp.server")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        address = addr(serve(registry, tracing="off"))
        stream.seek(0)
        stream.truncate()  # from here on: the records of the requests only
        yield stream, address
    finally:
        for logger, level in zip(loggers, levels, strict=True):  # as found: later tests log at DEBUG
            logger.removeHandler(handler)
            logger.setLevel(level)


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_records_inside_a_request_carry_its_cmdid_and_request_id(logged: tuple[io.StringIO, str]) -> None:
    stream, address = logged
    with Client(address, timeout=5, meta={"request_id": "req-42"}) as client:
        assert client.call(1) is True
        assert client.call(2) is True
        assert client.call(3) is True
        with pytest.raises(Exception, match="internal error"):
            client.call(4)
        assert client.call(1, meta={"request_id": "other"}) is True
    with Client(address, timeout=5) as client:
        assert client.call(1) is True  # no request id: cmdid only
    wait_until(lambda: len(records(stream)) >= 6)
    by_message = [(r["message"], r.get("cmdid"), r.get("request_id")) for r in records(stream)]
    assert by_message == [
        ("inline handler", 1, "req-42"),
        ("after a handoff", 2, "req-42"),
        ("in a greenlet the handler started", None, None),  # outside the request's greenlet
        (by_message[3][0], 4, "req-42"),  # the server's own record of the failure
        ("inline handler", 1, "other"),
        ("inline handler", 1, None),
    ]
    failure = records(stream)[3]
    assert failure["logger"] == "geventtcp.server" and failure["level"] == "ERROR"
    assert "RuntimeError: broken" in failure["exception"]
    outside = records(stream)[2]
    assert set(outside) == {"time", "level", "pid", "logger", "message"}
    assert outside["time"].endswith("Z") and outside["pid"] > 0


def test_a_record_outside_any_request_has_none() -> None:
    assert current_request() is None
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert RequestFilter().filter(record) is True
    assert (record.cmdid, record.request_id) == (None, None)  # type: ignore[attr-defined]


def test_text_format_shows_the_request_id_only_when_there_is_one(serve: Callable[..., Server]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.addFilter(RequestFilter())
    app_log.addHandler(handler)
    level = app_log.level
    app_log.setLevel(logging.INFO)
    registry = Registry()
    registry.add(1, inline)
    try:
        with Client(addr(serve(registry, tracing="off")), timeout=5) as client:
            client.call(1, meta={"request_id": "abc-1"})
            client.call(1)
        app_log.info("outside")
    finally:
        app_log.removeHandler(handler)
        app_log.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(" INFO tests.request_logs [abc-1]: inline handler")
    assert lines[1].endswith(" INFO tests.request_logs: inline handler")
    assert lines[2].endswith(" INFO tests.request_logs: outside")


def test_json_format_escapes_a_message_onto_one_line() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "two\nlines \u00e9 %s", ("\x1b",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii()
    assert json.loads(line)["message"] == "two\nlines \u00e9 \x1b"


APP = '''
import logging
from geventtcp import urls

log = logging.getLogger("geventtcp.app.orders")

@urls.handler(1)
def create(request):
    log.warning("creating %s", request.params["name"])
    return {"ok": True}
'''


@pytest.mark.subprocess
def test_log_format_json_in_a_real_server(tmp_path: Path) -> None:
    (tmp_path / "jsonapp.py").write_text(APP)
    server = CliServer([sys.executable, "-m", "geventtcp", "serve", "jsonapp", "--bind", "127.0.0.1:0",
                        "--log-format", "json", "--access-log"], cwd=tmp_path)
    try:
        with Client(server.address, timeout=10) as client:
            assert client.call(1, {"name": "x"}, meta={"request_id": "r-77"}) == {"ok": True}
    finally:
        server.proc.terminate()
    lines = [json.loads(line) for line in server.rest_of_output().splitlines() if line.strip()]
    app = [r for r in lines if r["logger"] == "geventtcp.app.orders"]
    assert [(r["message"], r["level"], r["cmdid"], r["request_id"]) for r in app] == [
        ("creating x", "WARNING", 1, "r-77")]
    # The client's HELLO (cmdid -5) has an access line of its own, outside any request_id.
    access = [r for r in lines if r["logger"] == "geventtcp.access" and "cmdid=-5" not in r["message"]]
    assert len(access) == 1 and access[0]["request_id"] == "r-77" and "cmdid=1" in access[0]["message"]
    assert all(r["pid"] > 0 and r["time"].endswith("Z") for r in lines)
    assert any("listening on" in r["message"] and "cmdid" not in r for r in lines)
