"""What each worker process owns: a PostgreSQL connection pool and a redis client (:class:`Resources`).

Made per worker, after the fork, by the application's ``post_worker_init`` hook and closed by its
``worker_exit`` hook (:func:`register_hooks`): a pool opened in the master and copied by ``fork``
would share its sockets between processes. ``geventtcp serve`` runs both hooks in every worker;
``geventtcp.testing.TestClient`` runs them in its server thread.

psycopg 3 and redis-py are pure Python over the socket module, so under the worker's monkey-patching
a query or a cache call yields to other requests (docs/cooperative.md); ``psycopg_pool`` starts its
maintenance "threads", greenlets there.

Who closes what: :meth:`Resources.close` closes the pool (its connections are terminated
cleanly: PostgreSQL's ``pg_stat_activity`` loses them at once) and the redis client. Until
:meth:`Resources.open`, and after close, :attr:`pool` and :attr:`cache` raise
``DependencyUnavailable``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from psycopg_pool import ConnectionPool

from geventtcp import DependencyUnavailable, Registry
from orders.config import Config

__all__ = ["Resources", "register_hooks"]

log = logging.getLogger("orders.resources")


class Resources:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._pool: ConnectionPool | None = None
        self._cache: redis.Redis | None = None

    def open(self) -> None:
        cfg = self.config
        # application_name: which process holds a connection, in pg_stat_activity
        self._pool = ConnectionPool(cfg.database_url, min_size=1, max_size=cfg.pool_size, open=True,
                                    kwargs={"application_name": f"orders-{os.getpid()}"}, name="orders")
        self._cache = redis.Redis.from_url(cfg.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        log.info("worker %d: pool of %d connections and redis client opened", os.getpid(), cfg.pool_size)

    def close(self) -> None:
        pool, cache, self._pool, self._cache = self._pool, self._cache, None, None
        if pool is not None:
            pool.close()
        if cache is not None:
            cache.close()
        log.info("worker %d: pool and redis client closed", os.getpid())

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise DependencyUnavailable("the database pool is not open in this worker",
                                        details={"dependency": "postgres"})
        return self._pool

    @property
    def cache(self) -> redis.Redis:
        if self._cache is None:
            raise DependencyUnavailable("the redis client is not open in this worker", details={"dependency": "redis"})
        return self._cache


def register_hooks(registry: Registry, resources: Resources) -> None:
    """Open ``resources`` in each worker once the application is imported, close them as it exits."""

    @registry.hook("post_worker_init")
    def open_resources(worker: Any) -> None:
        resources.open()

    @registry.hook("worker_exit")
    def close_resources(server: Any, worker: Any) -> None:
        resources.close()
