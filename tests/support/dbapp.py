"""An application that waits in real servers: PostgreSQL through a chosen driver setup, and redis.

Served by ``geventtcp serve tests.support.dbapp`` (the driver tests, ``bench/pg_sleep.py``),
configured by the environment, read at import (so in the worker, after fork and monkey-patching):

* ``DBAPP_PG_DSN``: the PostgreSQL to use; ``DBAPP_REDIS_URL``: the redis (cmdid 2 only).
* ``DBAPP_DRIVER``: how cmdid 1 reaches PostgreSQL:

  - ``psycopg2``: psycopg2 as is, one connection per request (blocks the worker: no wait callback);
  - ``psycogreen``: the same after ``psycogreen.gevent.patch_psycopg()`` (the documented fix);
  - ``psycopg``: psycopg 3 with a ``psycopg_pool.ConnectionPool`` of ``DBAPP_POOL_SIZE``
    connections (default 10), opened at import and filled before the worker serves.

cmdid 1 ``{"seconds": s}`` runs ``SELECT pg_sleep(s)``; its psycopg2 cursor is a ``DictCursor``,
whose ``execute`` is Python code in ``psycopg2.extras`` (a test finds that module named by the
blocking detector). cmdid 2 ``{"seconds": s}`` is a redis ``BLPOP`` on an empty list that times
out after ``s``: redis-py is pure Python, so monkey-patching alone makes it cooperative.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from geventtcp import Registry

registry = Registry()
DRIVER = os.environ.get("DBAPP_DRIVER", "psycopg")
DSN = os.environ.get("DBAPP_PG_DSN", "")

if DRIVER == "psycopg":
    from psycopg_pool import ConnectionPool

    size = int(os.environ.get("DBAPP_POOL_SIZE", "10"))
    pool = ConnectionPool(DSN, min_size=size, max_size=size, open=True)
    pool.wait(timeout=60)

    def pg_sleep(seconds: float) -> None:
        with pool.connection() as conn:
            conn.execute("SELECT pg_sleep(%s)", [seconds])

elif DRIVER in ("psycopg2", "psycogreen"):
    if DRIVER == "psycogreen":
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()  # before the first connection: the documented setup
    import psycopg2
    import psycopg2.extras

    def pg_sleep(seconds: float) -> None:
        conn = psycopg2.connect(DSN)
        try:
            with conn.cursor(cursor_factory=psycopg2.extras.DictCursor) as cur:
                cur.execute("SELECT pg_sleep(%s)", [seconds])
        finally:
            conn.close()

else:
    raise ValueError(f"DBAPP_DRIVER must be psycopg, psycopg2 or psycogreen, not {DRIVER!r}")


@registry.handler(1)
def sleep_in_postgres(request: Any) -> int:
    """``SELECT pg_sleep(params.seconds)``; the serving pid."""
    pg_sleep(float(request.params["seconds"]))
    return os.getpid()


_redis: redis.Redis | None = None


@registry.handler(2)
def wait_in_redis(request: Any) -> int:
    """``BLPOP`` on an empty list for params.seconds; the serving pid."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["DBAPP_REDIS_URL"])
    assert _redis.blpop([f"dbapp-empty-{os.getpid()}"], timeout=float(request.params["seconds"])) is None
    return os.getpid()
