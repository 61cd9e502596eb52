"""The client and protocol 1.1 (issue 14): HELLO on each new connection, completion order when the
server grants it, request order with a server that does not know HELLO, and least-in-flight spreading."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from geventtcp import Server
from geventtcp.client.client import Client
from geventtcp.client.connection import ClientConnection
from geventtcp.protocol import Builtin
from tests.support.apps import make_registry
from tests.support.faults import FakeServer
from tests.support.servers import addr, serve


def _conns(client: Client) -> list[ClientConnection]:
    return [conn for balancer in client._balancers.values() for pool in balancer.pools for conn in pool.conns]


def _old_server(server: Server) -> Server:
    """Make ``server`` a server before 1.1: HELLO unknown (answered as any unknown cmdid)."""
    del server.state.calls[Builtin.HELLO]
    del server.state.preauth_calls[Builtin.HELLO]
    return server


@pytest.fixture
def server() -> Iterator[Server]:
    with serve(make_registry()) as srv:
        yield srv


def _slow_then_fast(client: Client) -> tuple[float, bool]:
    """A 0.5 s call, then a fast one on the same connection: when the fast one returned, and whether
    the slow one was still running then."""
    slow = gevent.spawn(client.call, 2, {"seconds": 0.5})
    gevent.sleep(0.05)  # the slow request is written and running
    started = time.monotonic()
    assert client.call(1, {"fast": 1}) == {"fast": 1}
    took = time.monotonic() - started
    running = not slow.ready()
    assert slow.get(timeout=5) == {"slept": 0.5}
    return took, running


def test_a_fast_call_overtakes_a_slow_one_on_the_same_connection(server: Server) -> None:
    with Client(addr(server), timeout=5, pool_size=1) as client:
        assert client.call(1, {"warm": 1}) == {"warm": 1}
        (conn,) = _conns(client)
        assert conn.unordered and conn.hello_id is None
        took, running = _slow_then_fast(client)
        assert running and took < 0.3, took
        assert len(_conns(client)) == 1  # one connection carried both


def test_a_server_without_hello_keeps_request_order(server: Server) -> None:
    """A 1.0 server answers the HELLO 404: the client falls back to request order (the fast call
    waits behind the slow one on the one connection) and every call is answered."""
    _old_server(server)
    with Client(addr(server), timeout=5, pool_size=1) as client:
        assert client.call(1, {"warm": 1}) == {"warm": 1}
        (conn,) = _conns(client)
        assert not conn.unordered and conn.hello_id is None
        took, running = _slow_then_fast(client)
        assert not running and took > 0.3, took
    assert server.stats.unknown_commands == 1  # the one HELLO


def test_a_server_without_hello_and_with_auth_keeps_request_order() -> None:
    """Before AUTH a 1.0 server answers the unknown HELLO 401: still only a fallback, AUTH succeeds."""
    with serve(make_registry(), auth_token="s3cret") as server:
        _old_server(server)
        with Client(addr(server), timeout=5, pool_size=1, auth_token="s3cret") as client:
            assert client.call(1, {"a": 1}) == {"a": 1}
            (conn,) = _conns(client)
            assert not conn.unordered


def test_hello_is_sent_before_auth_and_granted() -> None:
    with serve(make_registry(), auth_token="s3cret") as server:
        with Client(addr(server), timeout=5, pool_size=1, auth_token="s3cret") as client:
            assert client.call(1, {"a": 1}) == {"a": 1}
            (conn,) = _conns(client)
            assert conn.unordered


def test_against_a_fake_1_0_server_one_hello_per_connection_and_none_when_disabled() -> None:
    def echo(fake: FakeServer, sock: Any, n: int) -> None:
        import json

        buf: list[bytes] = []
        while (line := fake.read_line(sock, buf)) is not None:
            req = json.loads(line)
            sock.sendall(json.dumps({"code": 0, "cmdid": req["cmdid"], "id": req["id"],
                                     "data": req["params"]}).encode() + b"\n")

    fake = FakeServer(echo)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            for i in range(3):
                assert client.call(1, {"i": i}) == {"i": i}
            assert not _conns(client)[0].unordered
        assert (fake.accepted, fake.hellos, len(fake.lines)) == (1, 1, 3)
        with Client(fake.address, timeout=5, pool_size=1, unordered=False) as client:
            assert client.call(1, {"i": 9}) == {"i": 9}
        assert (fake.accepted, fake.hellos, len(fake.lines)) == (2, 1, 4)
    finally:
        fake.close()


@pytest.mark.parametrize("unordered", [True, False], ids=["unordered", "ordered"])
def test_concurrent_greenlets_spread_over_the_pool_by_least_in_flight(server: Server, unordered: bool) -> None:
    """40 greenlets at once on a pool of 4: four connections, each carrying a fair share (it used to
    be one connection until 128 were in flight on it)."""
    with Client(addr(server), timeout=5, pool_size=4, unordered=unordered) as client:
        jobs = [gevent.spawn(client.call, 2, {"seconds": 0.1, "i": i}) for i in range(40)]
        gevent.joinall(jobs, raise_error=True, timeout=10)
        assert [job.value["slept"] for job in jobs] == [0.1] * 40
        conns = _conns(client)
        assert len(conns) == 4
        served = sorted(conn.requests - (1 if unordered else 0) for conn in server.connections)
        assert sum(served) == 40 and served[0] >= 5, served


def test_a_lone_caller_keeps_one_connection(server: Server) -> None:
    with Client(addr(server), timeout=5, pool_size=4) as client:
        for i in range(20):
            assert client.call(1, {"i": i}) == {"i": i}
        assert len(_conns(client)) == 1
