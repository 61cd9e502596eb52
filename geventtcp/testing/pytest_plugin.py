"""pytest fixtures for geventtcp applications; opt-in: ``pytest_plugins = ["geventtcp.testing.pytest_plugin"]``.

The package registers no pytest entry point, so installing geventtcp changes no other project's
test run; a project enables the plugin in its top-level ``conftest.py``.

Fixtures (each function-scoped, closed after its test):

``geventtcp_testclient``
    A :class:`~geventtcp.testing.TestClient` of the application: in-process calls through the real
    request path.
``geventtcp_server``
    An :class:`~geventtcp.testing.AppServer`: ``geventtcp serve APP --bind 127.0.0.1:0`` in a
    subprocess with monkey-patched workers, started before the test (every worker serving) and
    stopped after it with TERM; the test fails (a teardown error) when the server crashed, exited
    with an error or a worker died while it ran. ``.client``, ``.address``, ``.addresses``, ``.pid``.
``geventtcp_client``
    ``geventtcp_server.client``: a :class:`~geventtcp.client.Client` connected to that server.
``geventtcp_app``
    The application: the ``geventtcp`` marker's ``app``, else the ``geventtcp_app`` ini option.
    Override this fixture to compute it (a :class:`~geventtcp.urls.Registry` works for the
    in-process client; the subprocess needs an app spec string).

Configuration, lowest to highest precedence: ini options (``geventtcp_app``, ``geventtcp_workers``,
``geventtcp_args``, ``geventtcp_start_timeout``), then the marker on a test, class or module::

    @pytest.mark.geventtcp(app="orders.handlers", workers=2, args=["--handler-timeout", "2"],
                           env={"ORDERS_DSN": "..."}, settings={"handler_timeout": 2},
                           client_options={"timeout": 5})

``workers``, ``args``, ``env`` and ``cwd`` (default: the rootdir) apply to the subprocess;
``settings`` (server settings as keywords) to the in-process client; ``client_options`` to both
clients.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from geventtcp.testing.client import TestClient
from geventtcp.testing.process import AppServer
from geventtcp.urls import Registry

__all__ = ["geventtcp_app", "geventtcp_client", "geventtcp_server", "geventtcp_testclient"]

MARKER = "geventtcp"
_OPTIONS = frozenset({"app", "workers", "args", "env", "cwd", "settings", "client_options"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("geventtcp_app", "geventtcp application for the fixtures: 'module' or 'module:attr'")
    parser.addini("geventtcp_workers", "worker processes of the geventtcp_server fixture", default="1")
    parser.addini("geventtcp_args", "more 'geventtcp serve' options for the geventtcp_server fixture", type="args")
    parser.addini("geventtcp_start_timeout", "seconds the geventtcp_server fixture waits for the server to serve",
                  default="30")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(app=None, workers=None, args=None, env=None, cwd=None, settings=None, "
        "client_options=None): how the geventtcp fixtures run the application for this test")


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``geventtcp`` marker's keywords, the closest marker winning per keyword."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers(MARKER))):  # farthest first: closer ones override
        unknown = set(marker.kwargs) - _OPTIONS
        if unknown or marker.args:
            raise pytest.UsageError(f"@pytest.mark.{MARKER} takes only the keywords {', '.join(sorted(_OPTIONS))}; "
                                    f"got {', '.join(sorted(unknown)) or 'positional arguments'}")
        options.update(marker.kwargs)
    return options


@pytest.fixture
def geventtcp_app(request: pytest.FixtureRequest) -> str | Registry:
    """The application spec (or a Registry, when this fixture is overridden to return one)."""
    app = _marker_options(request).get("app") or request.config.getini("geventtcp_app")
    if not app:
        raise pytest.UsageError("no geventtcp application: set geventtcp_app in the pytest ini file, mark the test "
                                f"@pytest.mark.{MARKER}(app='module'), or override the geventtcp_app fixture")
    result: str | Registry = app
    return result


@pytest.fixture
def geventtcp_testclient(request: pytest.FixtureRequest, geventtcp_app: str | Registry) -> Iterator[TestClient]:
    """An in-process :class:`TestClient` of the application, closed after the test."""
    options = _marker_options(request)
    with TestClient(geventtcp_app, client_options=options.get("client_options"),
                    **dict(options.get("settings") or {})) as client:
        yield client


@pytest.fixture
def geventtcp_server(request: pytest.FixtureRequest, geventtcp_app: str | Registry) -> Iterator[AppServer]:
    """The application served by ``geventtcp serve`` in a subprocess, on 127.0.0.1 port 0."""
    if not isinstance(geventtcp_app, str):
        raise pytest.UsageError("the geventtcp_server fixture runs the application in a subprocess: geventtcp_app "
                                f"must be an app spec string ('module' or 'module:attr'), not {geventtcp_app!r}")
    options = _marker_options(request)
    config = request.config
    server = AppServer(
        geventtcp_app,
        workers=int(options.get("workers") or config.getini("geventtcp_workers")),
        args=[*config.getini("geventtcp_args"), *options.get("args", ())],
        env=options.get("env"),
        cwd=options.get("cwd") or config.rootpath,
        start_timeout=float(config.getini("geventtcp_start_timeout")),
        client_options=options.get("client_options"),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()  # ServerFailed: a teardown error naming the crash, with the server's log


@pytest.fixture
def geventtcp_client(geventtcp_server: AppServer) -> Any:
    """A :class:`~geventtcp.client.Client` connected to :func:`geventtcp_server` (closed with it)."""
    return geventtcp_server.client
