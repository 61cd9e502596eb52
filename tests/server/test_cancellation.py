"""Item 17 of issue 10: a handler can notice that its client is gone, and may ask to be interrupted.

"Gone" means the connection was aborted (reset by the peer, a failed send, the write timeout,
``Server.close``): ``request.cancelled`` turns true. A peer that only half-closes (EOF) still gets
its replies, so its handlers are not cancelled. A command registered with
``cancel_on_disconnect=True`` also gets :class:`RequestCancelled` thrown into its greenlet.
"""

from __future__ import annotations

import socket as stdsocket
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest

from geventtcp import BaseHandler, Registry, RequestCancelled, Server
from tests.support.apps import make_registry
from tests.support.rawconn import RawConn, rst
from tests.support.servers import settled
from tests.support.system import wait_until

Serve = Callable[..., Server]


class Probe:
    """What the test handlers saw: when ``cancelled`` turned true, whether they were interrupted."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled_after: list[float] = []
        self.interrupted = 0
        self.finished = 0


def probe_registry(probe: Probe) -> Registry:
    reg = make_registry()

    def watch(req: Any) -> Any:
        """Polls ``request.cancelled`` while it works, as a long job would between steps."""
        assert req.cancelled is False
        probe.started += 1
        start = time.monotonic()
        while time.monotonic() - start < req.params.get("seconds", 5):
            if req.cancelled:
                probe.cancelled_after.append(time.monotonic() - start)
                return "stopped"
            gevent.sleep(0.01)
        probe.finished += 1
        return req.cancelled

    def interruptible(req: Any) -> Any:
        probe.started += 1
        try:
            gevent.sleep(req.params.get("seconds", 5))
        except RequestCancelled:
            assert req.cancelled
            probe.interrupted += 1
            raise
        probe.finished += 1
        return req.cancelled

    def plain(req: Any) -> Any:
        probe.started += 1
        gevent.sleep(req.params.get("seconds", 0.3))
        probe.finished += 1
        return req.cancelled

    reg.add(30, watch, name="watch")
    reg.add(31, interruptible, name="interruptible", cancel_on_disconnect=True)
    reg.add(32, plain, name="plain")
    return reg


@pytest.fixture
def probe() -> Probe:
    return Probe()


def test_handler_sees_cancelled_soon_after_the_peer_resets(serve: Serve, probe: Probe, hub_errors: list[Any]) -> None:
    server = serve(probe_registry(probe))
    c = RawConn(server.address)
    c.request(30, {"seconds": 5}, id=1)
    wait_until(lambda: probe.started == 1 and server.inflight == 1)
    rst(c.sock)
    wait_until(lambda: probe.cancelled_after, timeout=2.0)
    wait_until(lambda: server.inflight == 0 and not server.connections)
    assert probe.finished == 0
    assert hub_errors == []


def test_without_the_opt_in_a_handler_is_not_interrupted(serve: Serve, probe: Probe, hub_errors: list[Any]) -> None:
    server = serve(probe_registry(probe))
    c = RawConn(server.address)
    c.request(32, {"seconds": 0.5}, id=1)
    wait_until(lambda: probe.started == 1 and server.inflight == 1)
    rst(c.sock)
    wait_until(lambda: not server.connections)
    # Still running (it did not ask to be stopped), but no longer counted in flight: an aborted
    # connection releases its handlers' counts (issue 10 item 2), whose results have nowhere to go.
    assert probe.finished == 0 and probe.interrupted == 0 and server.inflight == 0
    wait_until(lambda: probe.finished == 1)
    assert probe.interrupted == 0 and server.inflight == 0
    assert hub_errors == []


def test_opt_in_interrupts_every_handed_off_handler_of_a_reset_connection(
        serve: Serve, probe: Probe, hub_errors: list[Any]) -> None:
    server = serve(probe_registry(probe))
    with RawConn(server.address) as other:
        c = RawConn(server.address)
        c.send(b"".join(b'{"cmdid":31,"id":%d,"params":{"seconds":5}}\n' % i for i in range(3)))
        wait_until(lambda: probe.started == 3 and server.inflight == 3)
        start = time.monotonic()
        rst(c.sock)
        wait_until(lambda: probe.interrupted == 3 and server.inflight == 0, timeout=2.0)
        assert time.monotonic() - start < 2.0 and probe.finished == 0
        assert other.call(31, {"seconds": 0.01}, id=9) == {"code": 0, "cmdid": 31, "id": 9, "data": False}
    wait_until(lambda: not server.connections)
    assert hub_errors == []


def test_a_half_closed_client_gets_its_replies_and_nothing_is_cancelled(
        serve: Serve, probe: Probe, hub_errors: list[Any]) -> None:
    server = serve(probe_registry(probe))
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":31,"id":1,"params":{"seconds":0.3}}\n{"cmdid":32,"id":2,"params":{"seconds":0.2}}\n'
               b'{"cmdid":30,"id":3,"params":{"seconds":0.2}}\n')
        wait_until(lambda: probe.started == 3)
        c.sock.shutdown(stdsocket.SHUT_WR)
        assert [c.line() for _ in range(3)] == [
            {"code": 0, "cmdid": 31, "id": 1, "data": False},
            {"code": 0, "cmdid": 32, "id": 2, "data": False},
            {"code": 0, "cmdid": 30, "id": 3, "data": False},
        ]
        c.expect_eof()
    assert probe.interrupted == 0 and probe.cancelled_after == []
    wait_until(lambda: settled(server) and not server.connections)
    assert hub_errors == []


def test_a_class_handler_opts_in_with_a_class_attribute(serve: Serve, hub_errors: list[Any]) -> None:
    seen: list[str] = []

    class Job(BaseHandler):
        cancel_on_disconnect = True

        def process(self, request: Any) -> Any:
            try:
                gevent.sleep(5)
            except RequestCancelled:
                seen.append("interrupted")
                raise

    reg = Registry()
    reg.add(1, Job)
    assert reg.info(1).cancel_on_disconnect
    server = serve(reg)
    c = RawConn(server.address)
    c.request(1, id=1)
    wait_until(lambda: server.inflight == 1)
    rst(c.sock)
    wait_until(lambda: seen == ["interrupted"] and server.inflight == 0, timeout=2.0)
    assert hub_errors == []


def test_server_close_kills_opted_in_handlers_without_a_cancel_as_well(
        serve: Serve, probe: Probe, hub_errors: list[Any]) -> None:
    server = serve(probe_registry(probe))
    c = RawConn(server.address)
    c.send(b'{"cmdid":31,"id":1,"params":{"seconds":5}}\n{"cmdid":31,"id":2,"params":{"seconds":5}}\n')
    wait_until(lambda: probe.started == 2 and server.inflight == 2)
    server.close()
    wait_until(lambda: server.inflight == 0 and not server.connections)
    assert probe.interrupted == 0 and probe.finished == 0  # GreenletExit (the kill), not RequestCancelled
    c.close()
    assert hub_errors == []
