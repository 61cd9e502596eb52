"""The orders service: its commands, params schemas and middleware, built by :func:`create_app`.

=====  ================  =====  ===============================================================
cmdid  command           scope  what it does
=====  ================  =====  ===============================================================
100    create_order      write  insert; a known idempotency key -> ALREADY_EXISTS (1006)
101    get_order         read   redis first, then PostgreSQL (cache-aside); none -> NOT_FOUND
102    list_orders       read   one keyset page (``after`` = the last id seen), at most max_page
103    set_status        write  update the status; invalidates the cached order
104    shipping_quote    read   the order, then the HTTP shipping service's price for it
=====  ================  =====  ===============================================================

Every command names its params with a dataclass (``params=``): geventtcp validates them before
the handler runs, answers a 400 listing each bad field, and ``list`` shows them as JSON Schema.

Middleware, in this order around every command:

* :func:`request_ids`: the request's ``meta["request_id"]``, or a new one when the caller sent none
  (put into ``request.meta`` so that every log record of the request carries it), and one log line
  per request with the command, outcome and time.
* :func:`authenticate`: ``meta["api_key"]`` must name a key of ``ORDERS_API_KEYS``; it gives the
  tenant (set in :data:`TENANT` for the handlers) and, for the write commands, must allow writing.
  A missing or unknown key is NOT_AUTHENTICATED (1016), a read-only key on a write ACCESS_DENIED
  (1007), ``details`` saying why; the handler does not run. (401 and 403 are the server's own:
  its AUTH token and protected mode.)

Errors: NOT_FOUND, ALREADY_EXISTS, NOT_AUTHENTICATED, ACCESS_DENIED and DEPENDENCY_UNAVAILABLE
(PostgreSQL or the shipping service down; redis down only slows reads, which go to the database),
each with ``details``; a retryable 503 when a worker already runs ``pool_size`` list queries
(``max_concurrency``).
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import psycopg
import psycopg_pool

from geventtcp import (
    AccessDenied,
    AlreadyExists,
    DependencyUnavailable,
    HandlerError,
    NotAuthenticated,
    NotFound,
    Registry,
    Request,
)
from orders import shipping, store
from orders.config import ApiKey, Config
from orders.resources import Resources, register_hooks

__all__ = ["create_app", "TENANT", "CREATE", "GET", "LIST", "SET_STATUS", "QUOTE"]

log = logging.getLogger("orders")

CREATE, GET, LIST, SET_STATUS, QUOTE = 100, 101, 102, 103, 104
#: The commands that change data: their API key must allow writing.
WRITES = frozenset({CREATE, SET_STATUS})
#: The tenant of the request being served, set by :func:`authenticate` (each request runs in a
#: context of its own, so concurrent requests never see each other's).
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("orders_tenant")


# -- params ----------------------------------------------------------------------------------


@dataclass
class CreateOrder:
    """A new order; ``idempotency_key`` is the client's name for it: sent again, it is ALREADY_EXISTS."""

    idempotency_key: str
    item: str
    quantity: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.quantity <= 1000:
            raise ValueError("quantity must be between 1 and 1000")
        if not self.idempotency_key or not self.item:
            raise ValueError("idempotency_key and item must not be empty")


@dataclass
class OrderId:
    id: int


@dataclass
class ListOrders:
    """One page: the orders with an id above ``after`` (0: from the start), at most ``limit``."""

    after: int = 0
    limit: int = 20


@dataclass
class SetStatus:
    id: int
    status: Literal["open", "shipped", "cancelled"]


@dataclass
class QuoteParams:
    id: int
    destination: str


# -- middleware ------------------------------------------------------------------------------


def request_ids(request: Request, call_next: Callable[[Request], Any]) -> Any:
    """Give the request an id (the caller's ``meta["request_id"]``, else a new one) and log its outcome."""
    if "request_id" not in request.meta:
        # request.meta is the request's own mapping: replacing it (never mutating a shared one) makes
        # geventtcp's log formatting find the id on every record written while this request runs.
        request.meta = {**request.meta, "request_id": uuid.uuid4().hex[:16]}
    started = time.perf_counter()
    outcome = "error"
    try:
        data = call_next(request)
        outcome = "ok"
        return data
    except HandlerError as exc:
        outcome = f"code {exc.code}"
        raise
    finally:  # also at the 504 deadline and when the client went away
        log.info("cmd %d %s in %.1f ms", request.cmdid, outcome, (time.perf_counter() - started) * 1000)


def authenticate(api_keys: dict[str, ApiKey]) -> Callable[[Request, Callable[[Request], Any]], Any]:
    """The auth middleware for ``api_keys`` (see the module docstring)."""

    def auth(request: Request, call_next: Callable[[Request], Any]) -> Any:
        key = request.meta.get("api_key")
        who = None if key is None else api_keys.get(key)
        if who is None:
            reason = "missing" if key is None else "unknown key"
            raise NotAuthenticated(f"api_key {reason}", details={"meta": "api_key", "reason": reason})
        if request.cmdid in WRITES and not who.write:
            raise AccessDenied("this api_key is read-only", details={"meta": "api_key", "reason": "read-only key"})
        TENANT.set(who.tenant)
        return call_next(request)

    return auth


# -- the application -------------------------------------------------------------------------


def create_app(config: Config | None = None) -> Registry:
    """The orders service's registry, with its hooks, middleware and commands (config: from the environment)."""
    cfg = Config.from_env() if config is None else config
    registry = Registry()
    resources = Resources(cfg)
    register_hooks(registry, resources)
    registry.middleware(request_ids)
    registry.middleware(authenticate(dict(cfg.api_keys)))

    @contextmanager
    def database(request: Request) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (committed on success, rolled back on an error), waiting for one no
        longer than the request's deadline allows; a database failure is DEPENDENCY_UNAVAILABLE."""
        wait = 5.0 if request.deadline is None else max(request.deadline - time.monotonic(), 0.001)
        try:
            with resources.pool.connection(timeout=wait) as conn:
                yield conn
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise DependencyUnavailable("database unavailable", details={"dependency": "postgres",
                                                                          "error": type(exc).__name__}) from exc

    def load(request: Request, order_id: int) -> store.Order:
        """The tenant's order ``order_id``: from the cache, else the database (then cached)."""
        tenant = TENANT.get()
        key = store.cache_key(tenant, order_id)
        order = store.cached_order(resources.cache, key)
        if order is not None:
            return order
        with database(request) as conn:
            order = store.find(conn, tenant, order_id)
        if order is None:
            raise NotFound("no such order", details={"id": order_id})
        store.remember(resources.cache, key, order, cfg.cache_ttl)
        return order

    @registry.handler(CREATE, name="create_order", params=CreateOrder)
    def create_order(request: Request) -> store.Order:
        """Create an order; a known idempotency_key is ALREADY_EXISTS (details: the existing order's id)."""
        p = cast(CreateOrder, request.params)  # validated by params=CreateOrder
        with database(request) as conn:
            order, created = store.insert(conn, TENANT.get(), p.idempotency_key, p.item, p.quantity)
        if not created:
            raise AlreadyExists("an order with this idempotency_key exists",
                                details={"idempotency_key": p.idempotency_key, "id": order["id"]})
        log.info("order %d created", order["id"])
        return order

    @registry.handler(GET, name="get_order", params=OrderId, idempotent=True)
    def get_order(request: Request) -> store.Order:
        """One order, from the redis cache or PostgreSQL."""
        return load(request, cast(OrderId, request.params).id)

    @registry.handler(LIST, name="list_orders", params=ListOrders, idempotent=True, max_concurrency=cfg.pool_size)
    def list_orders(request: Request) -> dict[str, Any]:
        """One page of the tenant's orders by id; ``next`` is the ``after`` of the next page (null: the last)."""
        p = cast(ListOrders, request.params)  # validated by params=ListOrders
        if not 1 <= p.limit <= cfg.max_page:
            raise HandlerError("bad params", details=[{"path": "limit", "reason": f"must be 1 to {cfg.max_page}"}])
        with database(request) as conn:
            orders, cursor = store.page(conn, TENANT.get(), p.after, p.limit)
        return {"orders": orders, "next": cursor}

    @registry.handler(SET_STATUS, name="set_status", params=SetStatus, idempotent=True)
    def set_status(request: Request) -> store.Order:
        """Change an order's status; the cached copy is deleted after the commit."""
        p = cast(SetStatus, request.params)  # validated by params=SetStatus
        tenant = TENANT.get()
        with database(request) as conn:
            order = store.set_status(conn, tenant, p.id, p.status)
        if order is None:
            raise NotFound("no such order", details={"id": p.id})
        store.forget(resources.cache, store.cache_key(tenant, p.id))
        return order

    @registry.handler(QUOTE, name="shipping_quote", params=QuoteParams, idempotent=True)
    def shipping_quote(request: Request) -> dict[str, Any]:
        """The shipping service's price for an order; it being down is DEPENDENCY_UNAVAILABLE."""
        p = cast(QuoteParams, request.params)  # validated by params=QuoteParams
        order = load(request, p.id)
        offer = shipping.quote(cfg.shipping_url, order["item"], order["quantity"], p.destination,
                               timeout=cfg.shipping_timeout, deadline=request.deadline)
        return {"id": order["id"], "destination": p.destination, **offer}

    return registry
