"""Fixtures of the orders example's tests: a database of its own on the real PostgreSQL, the real
redis, a stub shipping service, and the service's configuration for one test's tenant.

PostgreSQL and redis come from the suite's fixtures (``pg_dsn``, ``redis_url`` of
``tests/conftest.py``: ``$GEVENTTCP_TEST_PG_DSN`` in CI, else private servers started for the
session). Each test gets a tenant (and API keys) of its own, so tests share the table and the
cache without seeing each other's rows or keys. The shipping service is a stdlib HTTP server in a
thread (:class:`ShippingStub`) whose ``mode`` a test sets: ``ok``, ``fail`` (500) or ``slow``.
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

EXAMPLE_DIR = Path(__file__).resolve().parent.parent
if str(EXAMPLE_DIR) not in sys.path:  # `import orders` as `geventtcp serve orders` does from that directory
    sys.path.insert(0, str(EXAMPLE_DIR))

from orders.config import ApiKey, Config  # noqa: E402
from orders.schema import create_schema  # noqa: E402

from tests import conftest as suite  # noqa: E402
from tests.support.postgres import new_database  # noqa: E402

pg_dsn = suite.pg_dsn  # the suite's real-server fixtures, reused (not copied)
redis_url = suite.redis_url

pytest_plugins = ["geventtcp.testing.pytest_plugin"]


class ShippingStub(http.server.ThreadingHTTPServer):
    """``GET /quote`` answering a fixed price (``ok``), a 500 (``fail``), or nothing until released (``slow``)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _QuoteHandler)
        self.mode = "ok"
        self.requests: list[dict[str, list[str]]] = []
        self.release = threading.Event()  # ends a slow reply (set at teardown)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _QuoteHandler(http.server.BaseHTTPRequestHandler):
    server: ShippingStub

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        stub = self.server
        stub.requests.append(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
        if stub.mode == "slow":
            stub.release.wait(30)
        if stub.mode == "fail":
            self.send_error(500, "shipping is down")
            return
        body = json.dumps({"carrier": "acme-post", "price_cents": 1250, "days": 3}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture(scope="session")
def orders_db(pg_dsn: str) -> str:
    """The DSN of a database of the example's own (recreated empty per session), schema created."""
    dsn = new_database(pg_dsn, "orders_example")
    create_schema(dsn)
    return dsn


@pytest.fixture
def shipping() -> Iterator[ShippingStub]:
    stub = ShippingStub()
    thread = threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield stub
    stub.release.set()
    stub.shutdown()
    stub.server_close()
    thread.join(10)


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def api_keys(tenant: str) -> dict[str, str]:
    """This test's keys: ``rw`` (read and write) and ``ro`` (read only), both for ``tenant``."""
    return {"rw": f"rw-{tenant}", "ro": f"ro-{tenant}"}


@pytest.fixture
def config(orders_db: str, redis_url: str, shipping: ShippingStub, tenant: str, api_keys: dict[str, str]) -> Config:
    return Config(database_url=orders_db, redis_url=redis_url, shipping_url=shipping.url,
                  api_keys={api_keys["rw"]: ApiKey(tenant, write=True), api_keys["ro"]: ApiKey(tenant, write=False)},
                  pool_size=3, cache_ttl=60, shipping_timeout=2.0)


@pytest.fixture
def orders_env(config: Config, api_keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``config`` as the ``ORDERS_*`` environment a served ``geventtcp serve orders`` reads (set here,
    so the served fixture's subprocess inherits it)."""
    env = {
        "ORDERS_DATABASE_URL": config.database_url,
        "ORDERS_REDIS_URL": config.redis_url,
        "ORDERS_SHIPPING_URL": config.shipping_url,
        "ORDERS_API_KEYS": ",".join(f"{key}={who.tenant}{'' if who.write else ':read'}"
                                    for key, who in config.api_keys.items()),
        "ORDERS_POOL_SIZE": str(config.pool_size),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def pg_connections(orders_db: str) -> Any:
    """``pg_connections(pid=None)``: the ``application_name`` of each connection an orders process
    (any, or worker ``pid``) holds to the example's database, as PostgreSQL lists them in
    ``pg_stat_activity`` (the pool names its connections ``orders-PID``)."""

    def connections(pid: int | None = None) -> list[str]:
        pattern = "orders-%" if pid is None else f"orders-{pid}"
        with psycopg.connect(orders_db, autocommit=True) as conn:
            rows = conn.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                                "AND application_name LIKE %s", (pattern,)).fetchall()
        return sorted(str(row[0]) for row in rows)

    return connections


@pytest.fixture
def example_dir() -> Path:
    return EXAMPLE_DIR
