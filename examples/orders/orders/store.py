"""The orders table (PostgreSQL, psycopg 3) and its redis cache: plain functions over a connection.

Handlers borrow a connection from the worker's pool (:mod:`orders.resources`) and call these; each
function is one statement, so autocommit-style transactions (the pool's ``with pool.connection()``
commits on success, rolls back on an exception) are all they need.

The cache is cache-aside: :func:`cached_order` reads redis first and falls back to the database,
then stores the row for ``ttl`` seconds; every write deletes the key after committing
(:func:`forget`), so a reader sees the new row at the latest on its next miss. Redis being down
is not an error: a read goes to the database (logged), a delete that failed leaves at most
``ttl`` seconds of a stale row (logged).

The schema is :mod:`orders.schema`'s.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import psycopg
import redis
from psycopg.rows import dict_row

__all__ = ["Order", "insert", "find", "page", "set_status", "cache_key", "cached_order", "remember",
           "forget"]

log = logging.getLogger("orders.store")
COLUMNS = "id, item, quantity, status, created_at"

Order = dict[str, Any]


def _order(row: dict[str, Any]) -> Order:
    created: datetime = row["created_at"]
    return {**row, "created_at": created.isoformat()}


def insert(conn: psycopg.Connection[Any], tenant: str, key: str, item: str, quantity: int) -> tuple[Order, bool]:
    """Insert the order unless ``(tenant, key)`` exists: ``(order, True)``, or ``(the existing one, False)``."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"INSERT INTO orders (tenant, idempotency_key, item, quantity) VALUES (%s, %s, %s, %s) "
                    f"ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING {COLUMNS}",
                    (tenant, key, item, quantity))
        row = cur.fetchone()
        if row is not None:
            return _order(row), True
        cur.execute(f"SELECT {COLUMNS} FROM orders WHERE tenant = %s AND idempotency_key = %s", (tenant, key))
        existing = cur.fetchone()
        assert existing is not None, "ON CONFLICT found it; orders are never deleted"
        return _order(existing), False


def find(conn: psycopg.Connection[Any], tenant: str, order_id: int) -> Order | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {COLUMNS} FROM orders WHERE tenant = %s AND id = %s", (tenant, order_id))
        row = cur.fetchone()
    return None if row is None else _order(row)


def page(conn: psycopg.Connection[Any], tenant: str, after: int, limit: int) -> tuple[list[Order], int | None]:
    """Up to ``limit`` orders with ``id > after``, in id order, and the cursor of the next page
    (the last id here) or None when this is the last page (one extra row is read to know)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {COLUMNS} FROM orders WHERE tenant = %s AND id > %s ORDER BY id LIMIT %s",
                    (tenant, after, limit + 1))
        rows = [_order(row) for row in cur.fetchall()]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1]["id"] if more else None)


def set_status(conn: psycopg.Connection[Any], tenant: str, order_id: int, status: str) -> Order | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"UPDATE orders SET status = %s WHERE tenant = %s AND id = %s RETURNING {COLUMNS}",
                    (status, tenant, order_id))
        row = cur.fetchone()
    return None if row is None else _order(row)


def cache_key(tenant: str, order_id: int) -> str:
    return f"orders:{tenant}:{order_id}"


def cached_order(cache: redis.Redis, key: str) -> Order | None:
    """The cached order at ``key``, or None on a miss or when redis is down (logged)."""
    try:
        raw = cache.get(key)
    except redis.RedisError as exc:
        log.warning("cache read failed, reading the database: %s", exc)
        return None
    return None if raw is None else dict(json.loads(raw))


def remember(cache: redis.Redis, key: str, order: Order, ttl: int) -> None:
    try:
        cache.set(key, json.dumps(order), ex=ttl)
    except redis.RedisError as exc:
        log.warning("cache write failed: %s", exc)


def forget(cache: redis.Redis, key: str) -> None:
    try:
        cache.delete(key)
    except redis.RedisError as exc:
        log.warning("cache invalidation of %s failed; stale for at most the TTL: %s", key, exc)
