"""Issue 12, per-command concurrency limit: ``max_concurrency=k`` refuses the (k+1)th concurrent request
of a command with a retryable 503 before its handler (or middleware) runs; the count is given back
on every way out of the handler; only commands with a limit are wrapped; ``list`` shows the limit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent.event import Event

from geventtcp import Client, Registry, Server, ServiceUnavailable
from geventtcp.errors import (
    Code,
    DeadlineExceeded,
    HandlerError,
    InternalServerError,
    MaybeExecuted,
    RegistryError,
    ServerRefusal,
)
from geventtcp.protocol import Request
from tests.support.rawconn import RawConn, rst
from tests.support.servers import addr, settled
from tests.support.system import wait_until

Serve = Callable[..., Server]


class Gate:
    """Handlers that block until ``release`` is set; ``running`` counts those inside."""

    def __init__(self) -> None:
        self.release = Event()
        self.running = 0
        self.entered = 0
        self.middleware_calls = 0

    def handler(self, request: Request) -> Any:
        self.entered += 1
        self.running += 1
        try:
            how = request.params.get("how")
            if how == "error":
                raise HandlerError("refused")
            if how == "bug":
                raise RuntimeError("bug")
            if how == "forge":  # a handler cannot make its command's reply read "not processed"
                raise ServerRefusal("forged", Code.UNAVAILABLE)
            if how == "sleep":
                gevent.sleep(request.params["seconds"])
                return "slept"
            self.release.wait()
            return "done"
        finally:
            self.running -= 1

    def registry(self, limit: int = 2) -> Registry:
        reg = Registry()
        reg.add(1, self.handler, name="limited", max_concurrency=limit)
        reg.add(2, self.handler, name="cancellable", max_concurrency=1, cancel_on_disconnect=True)
        reg.add(3, lambda request: request.params, name="unlimited")

        @reg.middleware
        def count(request: Request, call_next: Callable[[Request], Any]) -> Any:
            self.middleware_calls += 1
            return call_next(request)

        return reg


def test_third_concurrent_call_is_refused_retryable_then_runs_after_release(serve: Serve) -> None:
    gate = Gate()
    server = serve(gate.registry(limit=2))
    # The third call on a connection of its own: replies come in request order per connection, so
    # on the holders' connection its 503 would wait behind their replies.
    with Client(addr(server), timeout=5, retries=0) as holders, Client(addr(server), timeout=5, retries=0) as client:
        first = [gevent.spawn(holders.call, 1) for _ in range(2)]
        wait_until(lambda: gate.running == 2)
        with pytest.raises(ServiceUnavailable) as refused:
            client.call(1)
        assert refused.value.code == Code.UNAVAILABLE
        assert refused.value.retryable  # the client's "not processed: safe to resend"
        assert "max_concurrency" in refused.value.msg
        assert gate.entered == 2 and gate.middleware_calls == 2  # refused before middleware and handler
        assert client.call(3, {"other": "commands run"}) == {"other": "commands run"}
        gate.release.set()
        assert [g.get(timeout=5) for g in first] == ["done", "done"]
        assert client.call(1) == "done"
    assert server.stats.as_dict()["commands"]["1"]["errors"] >= 1


def test_the_client_retries_a_refusal_and_succeeds_once_a_place_is_free(serve: Serve) -> None:
    gate = Gate()
    server = serve(gate.registry(limit=1))
    with Client(addr(server), timeout=5) as holders, Client(addr(server), timeout=5, retries=5, backoff=0.05) as client:
        holder = gevent.spawn(holders.call, 1)
        wait_until(lambda: gate.running == 1)
        gevent.spawn_later(0.05, gate.release.set)
        assert client.call(1, {"how": "sleep", "seconds": 0}) == "slept"  # refused first, resent, then run
        assert holder.get(timeout=5) == "done"
    assert server.stats.commands[1].errors >= 1  # the refusals (nothing else failed)
    assert gate.entered == 2


@pytest.mark.parametrize("how", ["error", "bug", "deadline", "reset", "cancel"])
def test_the_place_is_given_back_on_every_way_out(serve: Serve, how: str, hub_errors: list[Any]) -> None:
    gate = Gate()
    server = serve(gate.registry(limit=1))
    cmdid = 2 if how == "cancel" else 1
    if how in ("error", "bug"):
        with RawConn(server.address) as conn:
            reply = conn.call(cmdid, {"how": how}, id=1)
            assert reply["code"] == (Code.BAD_REQUEST if how == "error" else Code.INTERNAL)
    elif how == "deadline":
        with RawConn(server.address) as conn:
            assert conn.call(cmdid, {}, id=1, timeout_ms=100)["code"] == Code.DEADLINE_EXCEEDED
    else:  # the client goes away: reset (runs on to its end) or cancel (RequestCancelled thrown in)
        conn = RawConn(server.address)
        conn.request(cmdid, {"how": "sleep", "seconds": 0.3} if how == "reset" else {}, id=1)
        wait_until(lambda: gate.running == 1)
        rst(conn.sock)
        wait_until(lambda: not server.connections)
    wait_until(lambda: gate.running == 0)
    wait_until(lambda: settled(server))
    gate.release.set()
    with Client(addr(server), timeout=5, retries=0) as client:  # the one place is free again
        assert client.call(cmdid) == "done"
    assert hub_errors == []


def test_a_handler_raising_server_refusal_is_a_500_not_a_refusal(serve: Serve) -> None:
    gate = Gate()
    server = serve(gate.registry(limit=2))
    with Client(addr(server), timeout=5, retries=0) as client:
        with pytest.raises(InternalServerError):
            client.call(1, {"how": "forge"})
    reg = Registry()

    def forge(request: Request) -> Any:
        raise ServerRefusal("forged", Code.UNAVAILABLE)

    reg.add(4, forge)  # no limit: never a 503 either
    other = serve(reg)
    with Client(addr(other), timeout=5, retries=0) as client, pytest.raises(InternalServerError):
        client.call(4)


def test_a_deadline_keeps_the_place_of_a_handler_that_swallows_it(serve: Serve) -> None:
    """The place is held until the handler really ends: it is still using what the limit protects."""
    reg = Registry()
    stop = Event()

    def stubborn(request: Request) -> Any:
        try:
            gevent.sleep(5)
        except BaseException:  # swallows DeadlineReached, then holds on
            stop.wait()
        return "late"

    reg.add(1, stubborn, max_concurrency=1)
    server = serve(reg)
    with Client(addr(server), timeout=5, retries=0) as client:
        with pytest.raises(DeadlineExceeded):
            client.call(1, timeout=0.2)
        with pytest.raises(ServiceUnavailable):
            client.call(1, timeout=0.2)
        stop.set()
        wait_until(lambda: settled(server))
        gevent.spawn_later(0.05, stop.set)
        with pytest.raises(DeadlineExceeded):  # runs again (and is stopped at its deadline again)
            client.call(1, timeout=0.2)


def test_only_limited_commands_are_wrapped_and_list_shows_the_limit(serve: Serve) -> None:
    reg = Registry()
    echo = lambda request: request.params  # noqa: E731
    reg.add(1, echo, name="unlimited")
    reg.add(2, echo, name="limited", max_concurrency=3)
    server = serve(reg)
    assert server.calls[1] is echo and server.calls[2] is not echo
    assert reg.info(2).max_concurrency == 3 and reg.info(1).max_concurrency is None
    with Client(addr(server), timeout=5) as client:
        listed = {item["cmdid"]: item for item in client.list()}
    assert listed[2]["max_concurrency"] == 3
    assert "max_concurrency" not in listed[1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_concurrency_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(RegistryError, match="max_concurrency"):
        Registry().add(1, lambda request: None, max_concurrency=bad)


def test_the_limit_holds_across_servers_sharing_a_registry(serve: Serve, hub_errors: list[Any]) -> None:
    """Review round 3: ``max_concurrency`` is sized to a per-process resource (a database pool); two
    Servers embedded in one process with one registry (a public and an admin port, tests) must not
    run 2k handlers at once. A place held by a handler that ``Server.close`` kills is given back."""
    gate = Gate()
    reg = gate.registry(limit=1)
    first, second = serve(reg), serve(reg)
    with Client(addr(first), timeout=5, retries=0) as holder, Client(addr(second), timeout=5, retries=0) as other:
        def hold() -> Any:
            try:
                return holder.call(1)
            except MaybeExecuted as exc:  # its server closed under it
                return exc

        held = gevent.spawn(hold)
        wait_until(lambda: gate.running == 1)
        with pytest.raises(ServiceUnavailable):  # the one place is taken, on the other server
            other.call(1)
        assert gate.entered == 1
        first.close()  # kills the holder's handler (GreenletExit): its place comes back
        wait_until(lambda: gate.running == 0)
        assert isinstance(held.get(timeout=5), MaybeExecuted)
        gate.release.set()
        assert other.call(1) == "done"
    assert hub_errors == []


def test_server_close_kills_a_handler_whose_connection_was_aborted(serve: Serve, hub_errors: list[Any]) -> None:
    """Review round 3: ``Server.close`` kills running handlers, but one whose connection had been aborted
    before (client reset) was forgotten with it and ran on after the close, holding its concurrency
    place (shared by the registry's other servers) until it ended by itself."""
    gate = Gate()
    reg = gate.registry(limit=1)
    first, second = serve(reg), serve(reg)
    conn = RawConn(first.address)
    conn.request(1, {}, id=1)
    wait_until(lambda: gate.running == 1 and first.inflight == 1)
    rst(conn.sock)
    wait_until(lambda: not first.connections)  # aborted; its handler waits on the gate
    assert gate.running == 1
    first.close()
    wait_until(lambda: gate.running == 0, timeout=3)  # killed (GreenletExit), its place given back
    gate.release.set()
    with Client(addr(second), timeout=5, retries=0) as client:
        assert client.call(1) == "done"
    assert hub_errors == []
