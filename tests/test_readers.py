"""Idle connections hold no greenlet: they park on their read watcher and share reader greenlets."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from greenlet import greenlet

from geventtcp import Server
from geventtcp.readers import ReaderPool

from .helpers import RawConn, wait_until


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
    gevent.sleep(0.05)  # callbacks the close scheduled have run
    assert "Traceback" not in capfd.readouterr().err
    assert not server.connections


def test_drain_answers_a_parked_connection_and_sends_goaway(serve: Callable[..., Server]) -> None:
    server = serve()
    with RawConn(server.address) as c:
        assert c.call(1, {})["code"] == 0
        wait_until(lambda: all(conn.parked for conn in server.connections))
        stopper = gevent.spawn(server.stop, 5)
        assert c.line()["goaway"] == "shutdown"
        c.expect_eof()
        stopper.get(timeout=10)


def test_a_failing_target_is_logged_and_its_connection_aborted(caplog: pytest.LogCaptureFixture) -> None:
    pool = ReaderPool()

    class Conn:
        aborted = False

        def boom(self) -> None:
            raise RuntimeError("bug in the read loop")

        def abort(self) -> None:
            self.aborted = True

    conn = Conn()
    with caplog.at_level(logging.ERROR, logger="geventtcp.server"):
        gevent.get_hub().loop.run_callback(pool.run, conn.boom)
        wait_until(lambda: conn.aborted)
    assert "reader greenlet failed" in caplog.text and pool.free == []  # that greenlet is gone


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
