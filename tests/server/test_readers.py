"""Idle connections hold no greenlet: they park on their read watcher and share reader greenlets."""

from __future__ import annotations

import contextvars
import gc
import logging
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest
from greenlet import GreenletExit, greenlet

from geventtcp import Registry, Server
from geventtcp.server.connection import RECV_SIZE, Connection
from geventtcp.server.readers import ReaderPool
from tests.support.rawconn import RawConn
from tests.support.system import wait_until


def live_greenlets() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and not obj.dead)


def test_idle_connections_hold_no_greenlet(serve: Callable[..., Server]) -> None:
    server = serve()
    before = live_greenlets()
    conns = [RawConn(server.address) for _ in range(200)]
    try:
        for c in conns:
            c.request(1, {"n": 1})
        assert all(c.line()["data"] == {"n": 1} for c in conns)
        wait_until(lambda: len(server.connections) == 200 and all(c.parked for c in server.connections))
        assert all(c.reader is None for c in server.connections)
        # Greenlets that stay: the free readers (bounded by ``keep``), not one per connection.
        assert live_greenlets() - before <= server.readers.keep < 200
        for c in conns:  # every parked connection resumes on input
            assert c.call(1, {"again": True})["data"] == {"again": True}
    finally:
        for c in conns:
            c.close()


def test_a_partial_line_survives_parking(serve: Callable[..., Server]) -> None:
    server = serve()
    with RawConn(server.address) as c:
        c.send(b'{"cmdid": 1, "params": {"half"')
        wait_until(lambda: any(conn.parked for conn in server.connections))
        c.send(b': 1}}\n')
        assert c.line()["data"] == {"half": 1}


def test_a_lone_request_costs_one_recv(serve: Callable[..., Server]) -> None:
    """After a read that did not fill the buffer the reader parks at once: the second ``recv``, which
    would almost always fail with EAGAIN (and pay for its exception), is skipped."""
    server = serve()
    with RawConn(server.address) as c:
        assert c.call(1, {})["code"] == 0
        wait_until(lambda: len(server.connections) == 1 and all(conn.parked for conn in server.connections))
        (conn,) = server.connections
        sizes: list[int] = []
        real_recv = conn._raw_recv
        assert real_recv is not None

        def counting_recv(n: int) -> bytes:
            sizes.append(n)
            return real_recv(n)

        conn._raw_recv = counting_recv  # read again by each resumed reader
        for i in range(20):
            assert c.call(1, {"i": i})["data"] == {"i": i}
        wait_until(lambda: conn.parked)
        assert len(sizes) == 20


def test_a_flooding_peer_lets_the_hub_run_between_reads(serve: Callable[..., Server],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that keeps the receive buffer full is still read one buffer at a time through the
    hub (the reader parks after each batch), so it cannot hold the other connections off."""
    server = serve()
    with RawConn(server.address) as c:
        assert c.call(1, {})["code"] == 0
        wait_until(lambda: len(server.connections) == 1 and all(conn.parked for conn in server.connections))
        (conn,) = server.connections
        parks = []
        real_park = Connection._park

        def counting_park(self: Connection) -> None:  # a Connection has no __dict__: patch the class
            if self is conn:
                parks.append(1)
            real_park(self)

        monkeypatch.setattr(Connection, "_park", counting_park)
        line = b'{"cmdid":1,"params":{"pad":"' + b"x" * 200 + b'"}}\n'
        count = 5 * RECV_SIZE // len(line) + 1
        c.send(line * count)
        for _ in range(count):
            assert c.line()["code"] == 0
        assert len(parks) >= 5


def test_idle_timeout_closes_a_parked_connection_with_a_goaway(serve: Callable[..., Server]) -> None:
    server = serve(idle_timeout=0.3)
    with RawConn(server.address) as c:
        assert c.call(1, {})["code"] == 0
        wait_until(lambda: all(conn.parked for conn in server.connections))
        goaway = c.line(timeout=5)
        assert goaway.get("goaway") == "idle", goaway
        c.expect_eof()
    wait_until(lambda: not server.connections)


def test_close_aborts_parked_connections_without_hub_errors(serve: Callable[..., Server],
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    server = serve()
    conns = [RawConn(server.address) for _ in range(5)]
    for c in conns:
        assert c.call(1, {})["code"] == 0
    wait_until(lambda: len(server.connections) == 5 and all(c.parked for c in server.connections))
    server.close()
    for c in conns:
        c.expect_eof()
        c.close()
    gevent.idle()  # the loop has nothing pending: the callbacks the close scheduled have run
    assert "Traceback" not in capfd.readouterr().err
    assert not server.connections


@pytest.mark.slow
def test_drain_answers_a_parked_connection_and_sends_goaway(serve: Callable[..., Server]) -> None:
    server = serve()
    with RawConn(server.address) as c:
        assert c.call(1, {})["code"] == 0
        wait_until(lambda: all(conn.parked for conn in server.connections))
        stopper = gevent.spawn(server.stop, 5)
        assert c.line()["goaway"] == "shutdown"
        c.expect_eof()
        stopper.get(timeout=10)


def test_a_failing_read_loop_is_logged_and_its_connection_aborted(caplog: pytest.LogCaptureFixture) -> None:
    class Conn:
        closed = False
        aborted = 0

        def boom(self) -> None:
            raise RuntimeError("bug in the read loop")

        def killed(self) -> None:
            raise GreenletExit

        def abort(self) -> None:
            self.aborted += 1

    conn = Conn()
    pool = ReaderPool()
    with caplog.at_level(logging.ERROR, logger="geventtcp.server"):
        gevent.get_hub().loop.run_callback(pool.run, conn.boom)
        wait_until(lambda: conn.aborted == 1)
    assert "reader greenlet failed" in caplog.text
    # GreenletExit from a connection that is not closed (not a kill by Server.close) aborts it too:
    # otherwise it would sit with no reader, never answered and never timed out.
    gevent.get_hub().loop.run_callback(pool.run, conn.killed)
    wait_until(lambda: conn.aborted == 2)
    conn.closed = True
    gevent.get_hub().loop.run_callback(pool.run, conn.killed)
    wait_until(lambda: pool.created == 3)
    gevent.idle()  # the third run has finished (nothing pending in the loop)
    assert conn.aborted == 2 and pool.free == []  # already closed: nothing to abort; no greenlet kept


user_var: contextvars.ContextVar[Any] = contextvars.ContextVar("user", default=None)


def test_each_resumed_run_starts_with_empty_contextvars(serve: Callable[..., Server]) -> None:
    reg = Registry()

    def who(req: Any) -> Any:
        seen = user_var.get()
        if "set" in req.params:
            user_var.set(req.params["set"])
        return seen

    reg.add(1, who, name="who")
    server = serve(reg)

    def all_parked() -> bool:
        return bool(server.connections) and all(c.parked for c in server.connections)

    with RawConn(server.address) as a:
        a.call(1, {})
        wait_until(all_parked)
        assert a.call(1, {"set": "alice"})["data"] is None  # runs in a pooled greenlet, sets the var
        wait_until(all_parked)
        assert len(server.readers.free) == 1
        with RawConn(server.address) as b:
            b.call(1, {})
            wait_until(all_parked)
            assert b.call(1, {})["data"] is None  # the same pooled greenlet, a fresh context
        assert server.readers.created == 1


def test_free_greenlets_are_reused_and_bounded() -> None:
    pool = ReaderPool(keep=4)
    done: list[Any] = []
    gate = gevent.event.Event()

    def work(i: int) -> None:
        gate.wait()
        done.append((i, gevent.getcurrent()))

    run = gevent.get_hub().loop.run_callback
    for i in range(10):
        run(pool.run, work, i)
    wait_until(lambda: pool.created == 10)
    gate.set()
    wait_until(lambda: len(done) == 10)
    assert len(pool.free) == 4  # the other six ended
    for i in range(3):
        run(pool.run, work, 10 + i)
    wait_until(lambda: len(done) == 13)
    assert pool.created == 10  # reused, not created
    assert {id(g) for _, g in done[10:]} <= {id(g) for _, g in done[:10]}


def test_a_stray_throw_into_a_free_greenlet_takes_it_off_the_list() -> None:
    pool = ReaderPool()
    gevent.get_hub().loop.run_callback(pool.run, lambda: None)
    wait_until(lambda: len(pool.free) == 1)
    stray = pool.free[0]
    gevent.get_hub().loop.run_callback(stray.throw, gevent.Timeout())
    wait_until(lambda: stray.dead)
    assert pool.free == []


@pytest.mark.parametrize("blocks_first", [False, True], ids=["inline", "handed-off"])
@pytest.mark.parametrize("escape", ["timeout", "greenletexit"])
def test_a_base_exception_from_a_handler_is_a_500_and_frees_its_slot(
        serve: Callable[..., Server], escape: str, blocks_first: bool) -> None:
    reg = Registry()

    def escaping(req: Any) -> Any:
        if blocks_first:
            gevent.sleep(0.01)  # the handler blocks: it is handed off to its own greenlet first
        if escape == "timeout":
            with gevent.Timeout(0.001):
                gevent.sleep(1)
        raise GreenletExit

    reg.add(1, escaping, name="escaping")
    reg.add(2, lambda req: req.params, name="echo")
    server = serve(reg, max_inflight=2)
    with RawConn(server.address) as c:
        for i in range(4):  # more than max_inflight: a leaked in-flight count would give 503s
            c.send(b'{"cmdid":1,"id":%d}\n{"cmdid":2,"id":%d,"params":{"n":%d}}\n' % (2 * i, 2 * i + 1, i))
            first, second = c.line(), c.line()
            assert (first["id"], first["code"]) == (2 * i, 500), first
            assert (second["id"], second["code"], second["data"]) == (2 * i + 1, 0, {"n": i}), second
    wait_until(lambda: server.inflight == 0)


def test_close_kills_handlers_running_in_reader_greenlets(serve: Callable[..., Server],
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    server = serve()
    with RawConn(server.address) as c:
        c.request(2, {"seconds": 60}, id=1)
        wait_until(lambda: any(conn.handlers for conn in server.connections))
        (handler,) = next(iter(server.connections)).handlers
        server.close()
        c.expect_eof()
        wait_until(lambda: handler.dead)
    assert "Traceback" not in capfd.readouterr().err
