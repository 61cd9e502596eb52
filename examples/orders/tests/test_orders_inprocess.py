"""The orders example in process (geventtcp.testing.TestClient), against the real PostgreSQL and redis
and a stub HTTP shipping service: every command, its errors, the cache, the middleware and the
per-worker pool that the application's hooks open and close."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from orders import create_app
from orders import shipping as shipping_module
from orders.app import CREATE, GET, LIST, QUOTE, SET_STATUS
from orders.config import ApiKey, Config

from geventtcp import AccessDenied, AlreadyExists, BadRequest, DependencyUnavailable, NotAuthenticated, NotFound
from geventtcp.testing import TestClient
from tests.support.system import wait_until


@pytest.fixture
def tc(config: Config, api_keys: dict[str, str]) -> Iterator[TestClient]:
    """The service in process, calling with this test's read-write key."""
    with TestClient(create_app(config), client_options={"meta": {"api_key": api_keys["rw"]}}) as client:
        yield client


@pytest.fixture
def cache(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _create(tc: TestClient, key: str, item: str = "tea", quantity: int = 1) -> dict[str, Any]:
    order: dict[str, Any] = tc.call(CREATE, {"idempotency_key": key, "item": item, "quantity": quantity})
    return order


def test_create_then_get(tc: TestClient) -> None:
    order = _create(tc, "k1", "tea", 3)
    assert order["item"] == "tea" and order["quantity"] == 3 and order["status"] == "open"
    assert tc.call(GET, {"id": order["id"]}) == order


def test_a_known_idempotency_key_is_already_exists_naming_the_first_order(tc: TestClient, orders_db: str) -> None:
    first = _create(tc, "same-key")
    with pytest.raises(AlreadyExists) as exc:
        _create(tc, "same-key", item="coffee")
    assert exc.value.code == 1006
    assert exc.value.details == {"idempotency_key": "same-key", "id": first["id"]}


def test_get_missing_is_not_found(tc: TestClient) -> None:
    with pytest.raises(NotFound) as exc:
        tc.call(GET, {"id": 987654321})
    assert exc.value.code == 1005 and exc.value.details == {"id": 987654321}


def test_another_tenants_order_is_not_found(tc: TestClient, config: Config) -> None:
    order = _create(tc, "mine")
    other_app = create_app(dataclasses.replace(config, api_keys={"other-key": ApiKey("other", write=True)}))
    with TestClient(other_app, client_options={"meta": {"api_key": "other-key"}}) as other:
        with pytest.raises(NotFound):
            other.call(GET, {"id": order["id"]})


def test_get_is_cached_in_redis_and_served_from_it(tc: TestClient, cache: redis.Redis, tenant: str,
                                                   orders_db: str) -> None:
    order = _create(tc, "cached")
    key = f"orders:{tenant}:{order['id']}"
    assert cache.get(key) is None                        # create does not fill the cache
    tc.call(GET, {"id": order["id"]})
    assert 0 < cache.ttl(key) <= 60                      # cache-aside: stored on the miss, with the TTL
    with psycopg.connect(orders_db, autocommit=True) as conn:   # changed behind the service's back ...
        conn.execute("UPDATE orders SET item = 'changed' WHERE id = %s", (order["id"],))
    assert tc.call(GET, {"id": order["id"]})["item"] == "tea"   # ... so this read came from redis


def test_a_write_invalidates_the_cached_order(tc: TestClient, cache: redis.Redis, tenant: str) -> None:
    order = _create(tc, "to-ship")
    key = f"orders:{tenant}:{order['id']}"
    tc.call(GET, {"id": order["id"]})
    assert cache.exists(key)
    shipped = tc.call(SET_STATUS, {"id": order["id"], "status": "shipped"})
    assert shipped["status"] == "shipped"
    assert not cache.exists(key)                         # deleted after the commit
    assert tc.call(GET, {"id": order["id"]})["status"] == "shipped"


def test_set_status_of_a_missing_order_is_not_found(tc: TestClient) -> None:
    with pytest.raises(NotFound):
        tc.call(SET_STATUS, {"id": 987654321, "status": "cancelled"})


def test_keyset_paging_walks_every_order_once(tc: TestClient) -> None:
    ids = [_create(tc, f"page-{i}")["id"] for i in range(5)]
    seen, after, pages = [], 0, 0
    while True:
        page = tc.call(LIST, {"after": after, "limit": 2})
        pages += 1
        seen += [o["id"] for o in page["orders"]]
        if page["next"] is None:
            break
        assert page["next"] == page["orders"][-1]["id"]  # the cursor is the last id of the page
        after = page["next"]
    assert seen == ids and pages == 3                    # 2 + 2 + 1, in id order, this tenant's only


@pytest.mark.parametrize("limit", [0, 101])
def test_list_limit_is_bounded(tc: TestClient, limit: int) -> None:
    with pytest.raises(BadRequest) as exc:
        tc.call(LIST, {"limit": limit})
    assert exc.value.details == [{"path": "limit", "reason": "must be 1 to 100"}]


def test_bad_params_are_a_400_listing_each_field(tc: TestClient) -> None:
    with pytest.raises(BadRequest) as exc:
        tc.call(CREATE, {"idempotency_key": "k", "quantity": "three"})
    details: Any = exc.value.details
    paths = sorted(d["path"] for d in details)
    assert paths == ["item", "quantity"], exc.value.details
    with pytest.raises(BadRequest) as exc:
        tc.call(SET_STATUS, {"id": True, "status": "lost"})   # JSON true is not an id
    details = exc.value.details
    assert sorted(d["path"] for d in details) == ["id", "status"], details


def test_list_shows_each_commands_params_and_the_db_limit(tc: TestClient, config: Config) -> None:
    commands = {c["cmdid"]: c for c in tc.list()}
    assert set(commands) >= {CREATE, GET, LIST, SET_STATUS, QUOTE}
    assert commands[LIST]["max_concurrency"] == config.pool_size
    assert set(commands[CREATE]["params"]["properties"]) == {"idempotency_key", "item", "quantity"}


@pytest.mark.parametrize(("key", "cmdid", "code", "reason"), [
    (None, CREATE, 1016, "missing"),                      # NOT_AUTHENTICATED
    ("nope", CREATE, 1016, "unknown key"),
    ("ro", CREATE, 1007, "read-only key"),                # ACCESS_DENIED
])
def test_auth_refuses_before_the_handler_runs(tc: TestClient, api_keys: dict[str, str], orders_db: str, tenant: str,
                                              key: str | None, cmdid: int, code: int, reason: str) -> None:
    meta = {} if key is None else {"api_key": api_keys.get(key, key)}
    reply = tc.reply(cmdid, {"idempotency_key": "refused", "item": "tea"}, meta=meta)  # no default meta here
    assert reply["code"] == code and reply["details"] == {"meta": "api_key", "reason": reason}
    with psycopg.connect(orders_db) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE tenant = %s", (tenant,)).fetchone() == (0,)


def test_a_read_only_key_reads_and_the_client_raises_the_auth_classes(tc: TestClient, api_keys: dict[str, str]) -> None:
    order = _create(tc, "ro-read")
    assert tc.call(GET, {"id": order["id"]}, meta={"api_key": api_keys["ro"]})["id"] == order["id"]
    with pytest.raises(AccessDenied):
        tc.call(SET_STATUS, {"id": order["id"], "status": "cancelled"}, meta={"api_key": api_keys["ro"]})
    with pytest.raises(NotAuthenticated):
        tc.call(GET, {"id": order["id"]}, meta={"api_key": "nope"})


def test_shipping_quote_calls_the_http_dependency(tc: TestClient, shipping: Any) -> None:
    order = _create(tc, "ship-me", "tea", 2)
    quote = tc.call(QUOTE, {"id": order["id"], "destination": "Lisbon"})
    assert quote == {"id": order["id"], "destination": "Lisbon", "carrier": "acme-post", "price_cents": 1250,
                     "days": 3}
    assert shipping.requests == [{"item": ["tea"], "quantity": ["2"], "destination": ["Lisbon"]}]


def test_shipping_down_is_dependency_unavailable_with_details(tc: TestClient, shipping: Any) -> None:
    order = _create(tc, "ship-fail")
    shipping.mode = "fail"
    with pytest.raises(DependencyUnavailable) as exc:
        tc.call(QUOTE, {"id": order["id"], "destination": "Oslo"})
    assert exc.value.code == 1014
    assert exc.value.details == {"dependency": "shipping", "reason": "http status", "status": 500}


def test_shipping_unreachable_is_dependency_unavailable(config: Config, api_keys: dict[str, str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(dataclasses.replace(config, shipping_url=url))
        with TestClient(app, client_options={"meta": {"api_key": api_keys["rw"]}}) as tc:
            order = _create(tc, "ship-nowhere")
            with pytest.raises(DependencyUnavailable) as exc:
                tc.call(QUOTE, {"id": order["id"], "destination": "Oslo"})
    details: Any = exc.value.details
    assert details["reason"] == "unreachable"


def test_a_slow_dependency_is_cut_at_the_requests_deadline(tc: TestClient, shipping: Any) -> None:
    order = _create(tc, "ship-slow")
    shipping.mode = "slow"                               # answers only at teardown
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as exc:    # not a 504, not the configured 2 s
        tc.call(QUOTE, {"id": order["id"], "destination": "Rome"}, timeout=1.0)
    elapsed = time.monotonic() - started
    details: Any = exc.value.details
    assert details["reason"] == "timeout" and details["timeout"] <= 1.0 - shipping_module.REPLY_MARGIN
    assert elapsed < 1.0


def test_the_pool_is_opened_by_post_worker_init_and_closed_by_worker_exit(config: Config,
                                                                           pg_connections: Any) -> None:
    app = create_app(config)
    with TestClient(app, client_options={"meta": {"api_key": next(iter(config.api_keys))}}) as tc:
        wait_until(lambda: pg_connections(os.getpid()))    # min_size=1: opened when the "worker" started
        tc.call(LIST, {})
    # this process lives on: only the worker_exit hook closing the pool can end them
    wait_until(lambda: pg_connections(os.getpid()) == [])
