"""Item 10 of issue 10: ``max_inflight`` counts requests that block, and never refuses the built-ins.

A request is refused with 503 at a full limit only when its command has blocked before in this
worker (so it would block again and hold a place); built-ins and commands that answer inline are
always admitted, so a health check and STATS still work when the worker is full.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from geventtcp import Server
from tests.support.rawconn import RawConn
from tests.support.servers import settled
from tests.support.system import wait_until

Serve = Callable[..., Server]


def sleeps(*ids: int, seconds: float) -> bytes:
    return b"".join(json.dumps({"cmdid": 2, "id": i, "params": {"seconds": seconds}}).encode() + b"\n"
                    for i in ids)


@pytest.mark.slow
def test_builtins_and_inline_requests_pass_a_server_limit_full_of_blocked_requests(serve: Serve) -> None:
    server = serve(max_inflight=2)
    with RawConn(server.address) as a, RawConn(server.address) as b:
        a.send(sleeps(1, 2, seconds=1.0))
        wait_until(lambda: server.inflight == 2)
        assert b.call(-1, id=10)["code"] == 0  # PING (the load balancer's health check)
        stats = b.call(-3, id=11)
        assert stats["code"] == 0 and stats["data"]["inflight"] == 2
        assert b.call(-2, id=12)["code"] == 0  # LIST
        assert b.call(-4, id=13)["code"] == 0  # AUTH (auth off: succeeds)
        assert b.call(1, {"x": 1}, id=14) == {"code": 0, "cmdid": 1, "id": 14, "data": {"x": 1}}
        refused = b.call(2, {"seconds": 0.01}, id=15)  # a command known to block: refused, never run
        assert refused["code"] == 503 and "on this server" in refused["msg"]
        assert server.inflight == 2
        assert [a.line()["id"], a.line()["id"]] == [1, 2]
        wait_until(lambda: settled(server))
        assert b.call(2, {"seconds": 0.01}, id=16)["code"] == 0  # room again
    wait_until(lambda: server.inflight == 0 and not server.connections)


def test_builtins_and_inline_requests_pass_a_full_connection_limit(serve: Serve) -> None:
    server = serve(max_inflight_per_connection=2)
    with RawConn(server.address) as c:
        c.send(sleeps(0, 1, seconds=0.3) + b'{"cmdid":-1,"id":2}\n{"cmdid":-3,"id":3}\n{"cmdid":1,"id":4}\n'
               + sleeps(5, seconds=0.01))
        replies = [c.line() for _ in range(6)]
        assert [(r["id"], r["code"]) for r in replies] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 503)]
        assert "on this connection" in replies[5]["msg"]
        wait_until(lambda: settled(server))
        assert c.call(2, {"seconds": 0.01})["code"] == 0


@pytest.mark.slow
def test_a_command_not_yet_seen_blocking_runs_past_the_limit_once_then_is_refused(serve: Serve) -> None:
    """The documented approximation: admission cannot know that a command blocks until it has."""
    server = serve(max_inflight=1)
    with RawConn(server.address) as a, RawConn(server.address) as b:
        a.send(sleeps(1, seconds=1.0))
        wait_until(lambda: server.inflight == 1)
        b.request(9, {"seconds": 0.2, "size": 3}, id=2)  # sleep_then_big: has never blocked here
        wait_until(lambda: server.inflight == 2)  # it ran and blocked: counted beyond the limit
        assert b.line() == {"code": 0, "cmdid": 9, "id": 2, "data": "xxx"}
        assert server.inflight == 1  # a's sleep is still running
        again = b.call(9, {"seconds": 0.2, "size": 3}, id=3)
        assert again["code"] == 503  # now known to block: refused while full
        assert a.line()["id"] == 1
        wait_until(lambda: settled(server))
        assert b.call(9, {"seconds": 0.01, "size": 1}, id=4)["code"] == 0
