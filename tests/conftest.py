"""Shared fixtures: in-process servers on 127.0.0.1 port 0 with a test registry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

from geventtcp import Code, HandlerError, Registry, Server


def make_registry() -> Registry:
    """Handlers the server tests need; gevent.sleep stands in for monkey-patched blocking calls."""
    reg = Registry()
    reg.add(1, lambda req: req.params, name="echo")

    def sleep(req: Any) -> Any:
        gevent.sleep(req.params.get("seconds", 0))
        return {"slept": req.params.get("seconds", 0)}

    reg.add(2, sleep, name="sleep")

    def fail(req: Any) -> Any:
        raise RuntimeError("boom: secret traceback detail")

    reg.add(3, fail, name="fail")
    reg.add(4, lambda req: {1, 2}, name="unserializable")

    def refuse(req: Any) -> Any:
        raise HandlerError("no such user", Code.NOT_FOUND)

    reg.add(5, refuse, name="refuse")

    def spin(req: Any) -> Any:
        end = time.monotonic() + req.params.get("seconds", 0)
        while time.monotonic() < end:
            pass
        return "spun"

    reg.add(6, spin, name="spin")
    reg.add(7, lambda req: "x" * req.params.get("size", 0), name="big")
    reg.add(8, lambda req: {"id": req.id, "timestamp": req.timestamp, "raw": req.rawBody,
                            "address": list(req.address)}, name="introspect")

    def sleep_then_big(req: Any) -> Any:
        gevent.sleep(req.params.get("seconds", 0))
        return "x" * req.params.get("size", 0)

    reg.add(9, sleep_then_big, name="sleep_then_big")
    return reg


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Factory: ``serve(**settings)`` starts a Server on 127.0.0.1:0; all are closed after the test."""
    servers: list[Server] = []

    def start(registry: Registry | None = None, **settings: Any) -> Server:
        settings.setdefault("bind", "127.0.0.1:0")
        server = Server(registry if registry is not None else make_registry(), **settings)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def hub_errors(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[list[Any]]:
    """Exceptions that reach the hub, plus ERROR records of the server (a reader or handoff bug)."""
    hub = gevent.get_hub()
    errors: list[Any] = []
    original = hub.handle_error

    def record(context: Any, kind: Any, value: Any, tb: Any) -> None:
        errors.append(value)
        original(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", record)
    caplog.set_level(logging.ERROR, logger="geventtcp")
    yield errors
    errors.extend(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
