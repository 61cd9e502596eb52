"""Fixtures of the whole suite (helpers live in ``tests.support``): ``serve``, ``app_process``, ``hub_errors``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

from geventtcp import Registry, Server
from tests.support import servers
from tests.support.servers import ServerProcess


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Factory: ``serve(registry=None, **settings)`` starts a Server on 127.0.0.1:0 (``servers.serve``);
    all are closed after the test."""
    with contextlib.ExitStack() as stack:

        def start(registry: Registry | None = None, **settings: Any) -> Server:
            return stack.enter_context(servers.serve(registry, **settings))

        yield start


@pytest.fixture(scope="module")
def app_process() -> Iterator[ServerProcess]:
    """The client app (``tests.support.client_app``) in a one-process server subprocess, shared by the
    tests of a module (each module gets its own)."""
    proc = ServerProcess()
    yield proc
    proc.close()


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
