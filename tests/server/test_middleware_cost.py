"""Issue 12: what one no-op middleware and a concurrency limit cost per request, counted as
``tests/test_call_budget.py`` counts (Python calls into geventtcp per echo request, with
``sys.setprofile``), next to the same server without them: each is exactly one call more (the
middleware's link closure, or the limiter); the middleware's own body is the application's.
``pytest -s`` prints the numbers (docs/performance.md#middleware-cost)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from geventtcp import Registry, Server
from geventtcp.protocol import Request
from tests.support.rawconn import RawConn
from tests.test_call_budget import WARMUP, N, counting, echo, lone, per_request, pipelined


def noop(request: Request, call_next: Callable[[Request], Any]) -> Any:
    return call_next(request)


def measure(server: Server, run: Callable[[RawConn, int], None]) -> int:
    with RawConn(server.address[:2]) as conn:
        run(conn, WARMUP)
        with counting() as counts:
            run(conn, N)
    assert counts[("test_call_budget.py", "echo")] == N  # the handler ran every time, seen by the profiler
    return per_request(counts, N)


def registry(**options: Any) -> Registry:
    reg = Registry()
    reg.add(1, echo, name="echo", **options)
    return reg


@pytest.mark.parametrize("run", [lone, pipelined], ids=["lone", "pipelined"])
def test_one_noop_middleware_and_a_limit_each_cost_one_call_per_request(
        serve: Callable[..., Server], run: Callable[[RawConn, int], None]) -> None:
    bare = measure(serve(registry()), run)
    in_registry = registry()
    in_registry.middleware(noop)
    with_registry_mw = measure(serve(in_registry), run)
    with_server_mw = measure(serve(registry(), middleware=[noop]), run)
    with_limit = measure(serve(registry(max_concurrency=10)), run)
    print(f"\ncalls into geventtcp per request ({run.__name__}): none {bare}, one no-op middleware "
          f"{with_registry_mw} (registry) / {with_server_mw} (server list), max_concurrency {with_limit}")
    assert with_registry_mw == with_server_mw == bare + 1
    assert with_limit == bare + 1
