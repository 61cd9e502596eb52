"""The orders example as deployed: ``geventtcp serve orders --workers 2`` in a subprocess (the testing
kit's served fixture), configured by its ORDERS_* environment, against the real PostgreSQL and redis."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from orders.app import CREATE, GET, LIST

from geventtcp import NotFound
from geventtcp.testing import AppServer
from tests.support.system import wait_until

EXAMPLE_DIR = Path(__file__).resolve().parent.parent  # the server runs there, as `geventtcp serve orders` would

pytestmark = [pytest.mark.subprocess, pytest.mark.slow,
              pytest.mark.geventtcp(app="orders", workers=2, cwd=str(EXAMPLE_DIR))]


@pytest.fixture(autouse=True)
def _env(orders_env: dict[str, str]) -> None:
    """The ORDERS_* variables, set before the served fixture starts the server (which inherits them)."""


def test_two_workers_serve_with_a_pool_each_closed_on_term(geventtcp_server: AppServer, geventtcp_client: Any,
                                                          api_keys: dict[str, str], pg_connections: Any) -> None:
    meta = {"api_key": api_keys["rw"]}
    assert len(geventtcp_client.stats()["workers"]) == 2
    order = geventtcp_client.call(CREATE, {"idempotency_key": "served", "item": "tea"}, meta=meta)
    assert geventtcp_client.call(GET, {"id": order["id"]}, meta=meta) == order
    assert [o["id"] for o in geventtcp_client.call(LIST, {}, meta=meta)["orders"]] == [order["id"]]
    # each worker opened its own pool in post_worker_init: two processes hold connections
    holders = wait_until(lambda: set(pg_connections()) if len(set(pg_connections())) == 2 else None)
    assert str(geventtcp_server.pid) not in {name.split("-")[1] for name in holders}   # not the master
    assert geventtcp_server.stop() == 0                   # TERM: both workers drain and run worker_exit
    assert geventtcp_server.output().count("pool and redis client closed") == 2
    wait_until(lambda: pg_connections() == [])            # PostgreSQL saw every connection go


def test_logs_carry_the_request_id(geventtcp_server: AppServer, geventtcp_client: Any,
                                   api_keys: dict[str, str]) -> None:
    with pytest.raises(NotFound):
        geventtcp_client.call(GET, {"id": 987654321}, meta={"api_key": api_keys["rw"], "request_id": "rid-7f3a"})
    geventtcp_client.call(LIST, {}, meta={"api_key": api_keys["rw"]})      # no id: the middleware makes one
    geventtcp_server.stop()
    log = geventtcp_server.output()
    assert re.search(r"INFO orders \[rid-7f3a\]: cmd 101 code 1005 in [\d.]+ ms", log), log
    assert re.search(r"INFO orders \[[0-9a-f]{16}\]: cmd 102 ok in [\d.]+ ms", log), log


def test_the_schema_command_creates_the_table_idempotently(pg_dsn: str) -> None:
    """``python -m orders.schema URL``, the first of the two commands of docs/example.md."""
    import subprocess
    import sys

    import psycopg

    from tests.support.postgres import new_database

    dsn = new_database(pg_dsn, "orders_schema_cli")
    for _ in range(2):  # a second run finds everything there
        done = subprocess.run([sys.executable, "-m", "orders.schema", dsn], cwd=EXAMPLE_DIR, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == "schema ready\n" and done.stderr == "", done
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('orders'), to_regclass('orders_tenant_id')").fetchone() == (
            "orders", "orders_tenant_id")
