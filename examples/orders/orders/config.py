"""The service's settings, from environment variables (twelve-factor style): :class:`Config`.

Read when the application is built (:func:`orders.create_app`), that is when a worker imports it;
nothing connects then: the per-worker pool and redis client are opened by the ``post_worker_init``
hook (:mod:`orders.resources`). Tests build a :class:`Config` directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Config", "ApiKey", "parse_api_keys"]


@dataclass(frozen=True)
class ApiKey:
    """Who a key is: its tenant (every order belongs to one) and whether it may write."""

    tenant: str
    write: bool


def parse_api_keys(text: str) -> dict[str, ApiKey]:
    """``"KEY=TENANT,KEY2=TENANT2:read"``: a key per entry; ``:read`` makes it read-only.

    A malformed entry raises ValueError, so a worker with a bad setting fails to boot (the master
    stops after three) instead of refusing every request.
    """
    keys: dict[str, ApiKey] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        key, sep, who = entry.partition("=")
        tenant, _, mode = who.partition(":")
        if not sep or not key or not tenant or mode not in ("", "read"):
            raise ValueError(f"ORDERS_API_KEYS: bad entry {entry!r} (KEY=TENANT or KEY=TENANT:read)")
        keys[key] = ApiKey(tenant, write=mode != "read")
    return keys


@dataclass(frozen=True)
class Config:
    database_url: str = "postgresql://localhost/orders"
    redis_url: str = "redis://localhost:6379/0"
    shipping_url: str = "http://127.0.0.1:8080"
    api_keys: Mapping[str, ApiKey] = field(default_factory=dict)
    #: Connections per worker; also the DB-heavy command's max_concurrency (a request that could
    #: only wait for a connection is refused with a retryable 503 instead).
    pool_size: int = 4
    #: Seconds a cached order lives in redis (cache-aside: also deleted on every write).
    cache_ttl: int = 60
    #: The longest a shipping quote may wait for the HTTP service; the request's deadline can make it shorter.
    shipping_timeout: float = 2.0
    #: The most orders one page of the list command returns.
    max_page: int = 100

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """The settings named ``ORDERS_*`` in ``env``; the defaults above for those not set."""
        default = cls()
        return cls(
            database_url=env.get("ORDERS_DATABASE_URL", default.database_url),
            redis_url=env.get("ORDERS_REDIS_URL", default.redis_url),
            shipping_url=env.get("ORDERS_SHIPPING_URL", default.shipping_url),
            api_keys=parse_api_keys(env.get("ORDERS_API_KEYS", "")),
            pool_size=int(env.get("ORDERS_POOL_SIZE", default.pool_size)),
            cache_ttl=int(env.get("ORDERS_CACHE_TTL", default.cache_ttl)),
            shipping_timeout=float(env.get("ORDERS_SHIPPING_TIMEOUT", default.shipping_timeout)),
        )
