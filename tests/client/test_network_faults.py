"""The real Client through the fault-injection proxy (case 39): what a caller sees under each fault.

Every test runs in both reply modes (``unordered``: protocol 1.1's completion order, the default;
``ordered``: ``Client(unordered=False)``, request order as with a server before 1.1)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from geventtcp.client.client import Client
from geventtcp.errors import CallTimeout, MaybeExecuted
from geventtcp.urls import Registry
from tests.support.apps import make_registry
from tests.support.faults import FaultProxy
from tests.support.servers import serve
from tests.support.system import wait_until

executed: list[Any] = []


def registry() -> Registry:
    reg = make_registry()

    def record(req: Any) -> Any:  # not idempotent: counts executions
        executed.append(req.params.get("tag"))
        return {"tag": req.params.get("tag"), "timeout_ms": req.timeout_ms}

    reg.add(30, record)
    return reg


@pytest.fixture(params=[True, False], ids=["unordered", "ordered"])
def unordered(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def proxied() -> Iterator[tuple[Any, FaultProxy]]:
    executed.clear()
    with serve(registry()) as server:
        proxy = FaultProxy(server.address)
        try:
            yield server, proxy
        finally:
            proxy.close()


def test_one_byte_slices_both_ways(proxied: tuple[Any, FaultProxy], unordered: bool) -> None:
    _, proxy = proxied
    proxy.slice = 1
    with Client(proxy.address, timeout=10, pool_size=1, unordered=unordered) as client:
        jobs = [gevent.spawn(client.call, 1, {"i": i, "s": "é✓" * i}) for i in range(8)]
        gevent.joinall(jobs, raise_error=True)
        assert [j.value for j in jobs] == [{"i": i, "s": "é✓" * i} for i in range(8)]


def test_reset_after_request_written(proxied: tuple[Any, FaultProxy], unordered: bool) -> None:
    """Non-idempotent: MaybeExecuted and no automatic resend. Idempotent: resent and answered."""
    server, proxy = proxied
    with Client(proxy.address, timeout=5, pool_size=1, unordered=unordered) as client:
        assert client.call(30, {"tag": "warm"}) is not None  # connection (and AUTH-free handshake) done
        proxy.reset_after_upstream = proxy.links[0].up_bytes + 1
        with pytest.raises(MaybeExecuted):
            client.call(30, {"tag": "once"})
        wait_until(lambda: server.inflight == 0)
        assert executed.count("once") == 1  # it did run: "maybe" was the honest answer; never twice
        proxy.reset_after_upstream = sum(link.up_bytes for link in proxy.links if not link.closed) + 1
        assert client.call(30, {"tag": "idem"}, idempotent=True)["tag"] == "idem"
        assert proxy.resets == 2
        assert executed.count("idem") == 2  # ran, reply lost, resent because declared idempotent


def test_black_hole_times_out_and_recovers(proxied: tuple[Any, FaultProxy], unordered: bool) -> None:
    _, proxy = proxied
    with Client(proxy.address, timeout=5, pool_size=1, unordered=unordered) as client:
        assert client.call(1, {"a": 1}) == {"a": 1}
        proxy.blackhole = True
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            client.call(1, {"a": 2}, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 1.0  # deadline + 1 s at most
        proxy.blackhole = False
        assert client.call(1, {"a": 3}, timeout=5) == {"a": 3}


def test_cut_inside_a_reply_line(proxied: tuple[Any, FaultProxy], unordered: bool) -> None:
    """The client never parses half a line: MaybeExecuted for a non-idempotent call; resend if idempotent."""
    _, proxy = proxied
    with Client(proxy.address, timeout=5, pool_size=1, unordered=unordered) as client:
        assert client.call(1, {"warm": True}) == {"warm": True}
        proxy.cut_downstream_after = proxy.links[0].down_bytes + 10
        with pytest.raises(MaybeExecuted):
            client.call(30, {"tag": "cut"})
        assert executed.count("cut") == 1
        proxy.cut_downstream_after = sum(link.down_bytes for link in proxy.links if not link.closed) + 10
        assert client.call(1, {"x": "y" * 100}, idempotent=True) == {"x": "y" * 100}  # resent: idempotent
        assert proxy.cuts == 2


@pytest.mark.slow
def test_latency_deadline_is_honoured_and_sent_to_the_server(proxied: tuple[Any, FaultProxy], unordered: bool) -> None:
    server, proxy = proxied
    proxy.latency = 0.3
    with Client(proxy.address, timeout=5, pool_size=1, unordered=unordered) as client:
        reply = client.call(30, {"tag": "slow-link"}, timeout=3)
        assert reply["tag"] == "slow-link" and 0 < reply["timeout_ms"] <= 3000  # the caller's deadline went along
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            client.call(2, {"seconds": 0}, timeout=0.4)
        assert time.monotonic() - started < 0.4 + 0.5
        proxy.latency = 0
        assert client.call(1, {"ok": 1}, timeout=2) == {"ok": 1}
