"""The per-request path under stress: parking, eager reads, batched handoff watches, interrupts."""

from __future__ import annotations

import socket as stdsocket
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest

from geventtcp import Server
from geventtcp.server.connection import CLOSED, DONE, PARKED, READING, RECV_SIZE
from tests.support.apps import make_registry
from tests.support.rawconn import RawConn, rst
from tests.support.servers import settled
from tests.support.system import wait_until

Serve = Callable[..., Server]


def test_the_read_state_goes_reading_parked_done_closed_and_no_stray_attribute(serve: Serve) -> None:
    """One ``read_state`` says where reading is; a Connection has no ``__dict__``, so a misspelt
    attribute raises instead of silently creating a flag nobody reads."""
    server = serve()
    with RawConn(server.address) as c:
        assert c.call(1, {})["code"] == 0
        (conn,) = server.connections
        wait_until(lambda: conn.read_state == PARKED)
        assert conn.parked and not conn.closed
        with pytest.raises(AttributeError):
            conn.recieving = True  # type: ignore[attr-defined]
        conn.close_after_replies("closing", "bye")  # from outside the reader: a parked connection stops reading
        assert conn.read_state == DONE and not conn.parked
        conn._maybe_close()  # nothing in flight: DONE -> CLOSED, after the going-away line
        assert c.line() == {"code": 503, "cmdid": None, "goaway": "closing", "msg": "bye"}
        c.expect_eof()
    wait_until(lambda: not server.connections)
    assert conn.read_state == CLOSED and conn.closed and READING == 0


# -- input that arrives while the reader is busy (it parks without a recv) ----------------------


def test_input_that_arrives_while_a_batch_runs_is_read_after_the_park(serve: Serve, hub_errors: list[Any]) -> None:
    """The reader parks without a last ``recv`` after a batch: bytes that reached the socket while it
    dispatched (a whole line, half a line, EOF) must still wake it (the watcher is level-triggered)."""
    peer: dict[str, RawConn] = {}
    registry = make_registry()

    def inject(req: Any) -> Any:  # the peer writes while this batch is being dispatched
        peer["c"].send(req.params["bytes"].encode())
        return "injected"

    def half_close(req: Any) -> Any:
        peer["c"].sock.shutdown(stdsocket.SHUT_WR)
        return "shut"

    registry.add(40, inject)
    registry.add(41, half_close)
    server = serve(registry)
    with RawConn(server.address) as c:
        peer["c"] = c
        assert c.call(1, {})["code"] == 0
        (conn,) = server.connections
        wait_until(lambda: conn.parked)
        for i in range(30):
            assert c.call(40, {"bytes": f'{{"cmdid":1,"id":{i}}}\n'})["data"] == "injected"
            assert c.line()["id"] == i
        assert c.call(40, {"bytes": '{"cmdid":1,"id":"ha'})["data"] == "injected"
        wait_until(lambda: conn.parked)
        c.send(b'lf"}\n')
        assert c.line()["id"] == "half"
        # A handler that blocks, then EOF while a second request is still dispatched.
        c.send(b'{"cmdid":2,"id":"slow","params":{"seconds":0.2}}\n{"cmdid":41,"id":"shut"}\n')
        assert [c.line()["id"], c.line()["id"]] == ["slow", "shut"]
        c.expect_eof()
    wait_until(lambda: not server.connections)
    assert hub_errors == []


def test_a_flood_larger_than_the_buffer_then_eof_is_answered_whole(serve: Serve, hub_errors: list[Any]) -> None:
    """Several buffers of pipelined lines (split across reads mid-line) and a half-close right after:
    one reply per line in order, then the server closes."""
    server = serve()
    line = b'{"cmdid":1,"id":%d,"params":{"pad":"' + b"y" * 97 + b'"}}\n'
    lines = [line % i for i in range(4 * RECV_SIZE // len(line))]
    with RawConn(server.address) as c:

        def send_all_then_shut() -> None:
            c.send(b"".join(lines))
            c.sock.shutdown(stdsocket.SHUT_WR)

        sender = gevent.spawn(send_all_then_shut)
        for i in range(len(lines)):
            assert c.line()["id"] == i
        c.expect_eof()
        sender.get()
    assert hub_errors == []


# -- batched handoff watches ---------------------------------------------------------------------


def test_handoffs_started_inside_a_watch_pass_are_watched_too(serve: Serve, hub_errors: list[Any]) -> None:
    """A handoff's new reader runs inside ``ServerState.watch_all`` and may block again on the next pipelined
    line: that one needs the next pass. All of them must run at once and keep their deadlines."""
    server = serve(handler_timeout=0.5)
    conns = [RawConn(server.address) for _ in range(8)]
    try:
        batch = b"".join([
            b'{"cmdid":2,"id":1,"params":{"seconds":0.3}}\n',
            b'{"cmdid":1,"id":2}\n',
            b'{"cmdid":2,"id":3,"params":{"seconds":0.3}}\n',
            b'{"cmdid":2,"id":4,"params":{"seconds":0.3}}\n',
            b'{"cmdid":2,"id":5,"params":{"seconds":30}}\n',  # cut at handler_timeout: 504
            b'{"cmdid":2,"id":6,"params":{"seconds":0.3}}\n',
            b'{"cmdid":1,"id":7}\n',
        ])
        peak = 0

        def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, server.inflight)
                gevent.sleep(0.01)

        sampler = gevent.spawn(sample)
        for c in conns:
            c.send(batch)
        for c in conns:
            replies = [c.line() for _ in range(7)]
            assert [r["id"] for r in replies] == [1, 2, 3, 4, 5, 6, 7]
            assert [r["code"] for r in replies] == [0, 0, 0, 0, 504, 0, 0]
        sampler.kill()
        # Each connection's five blocking lines run at once (40 in all); one at a time would be 8.
        assert peak >= 24, peak
        wait_until(lambda: settled(server))
    finally:
        for c in conns:
            c.close()
    assert hub_errors == []


def test_a_handler_that_only_yields_is_handed_off(serve: Serve, hub_errors: list[Any]) -> None:
    """``sleep(0)`` in a loop: each yield lets the hub run the watch pass, so the next line is read."""
    registry = make_registry()

    def spin_yield(req: Any) -> Any:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            gevent.sleep(0)
        return "yielded"

    registry.add(42, spin_yield)
    server = serve(registry)
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":42,"id":1}\n{"cmdid":2,"id":2,"params":{"seconds":0.1}}\n')
        first = c.line()
        assert (first["id"], first["data"]) == (1, "yielded")
        assert c.line()["id"] == 2
        wait_until(lambda: settled(server))
    assert server.stats.commands[2].count == 1
    assert hub_errors == []


def test_close_while_a_watch_pass_is_pending(serve: Serve, hub_errors: list[Any]) -> None:
    """``Server.close`` from a handler that then blocks: the pending watch pass must skip the closed
    connections and the kill must not print anything in the hub."""
    registry = make_registry()
    holder: dict[str, Server] = {}

    def close_then_block(req: Any) -> Any:
        holder["server"].close()
        gevent.sleep(5)
        return "unreachable"

    registry.add(43, close_then_block)
    server = holder["server"] = serve(registry)
    others = [RawConn(server.address) for _ in range(5)]
    try:
        for c in others:
            c.send(b'{"cmdid":2,"id":1,"params":{"seconds":5}}\n')
        wait_until(lambda: server.inflight == 5)  # handed off
        parked = RawConn(server.address)
        assert parked.call(1, {})["code"] == 0
        with RawConn(server.address) as c:
            c.send(b'{"cmdid":2,"id":"b","params":{"seconds":5}}\n{"cmdid":43,"id":"x"}\n')
            c.expect_eof()
        for other in [*others, parked]:
            other.expect_eof()
        wait_until(lambda: not server.connections and not server.state.watching)
        wait_until(lambda: server.inflight == 0)
    finally:
        for c in others:
            c.close()
    assert hub_errors == []


def test_close_from_a_handoff_that_runs_inside_the_watch_pass(serve: Serve, hub_errors: list[Any]) -> None:
    """The reader a handoff starts runs inside ``ServerState.watch_all``; if its next line closes the server,
    the connections still in that pass are closed ones: skipped, their blocked readers killed."""
    registry = make_registry()
    holder: dict[str, Server] = {}

    def close_now(req: Any) -> Any:
        holder["server"].close()
        return "closed"

    registry.add(44, close_now)
    server = holder["server"] = serve(registry)
    conns = [RawConn(server.address) for _ in range(6)]
    try:
        for c in conns:  # every connection parked first, so the lines below arrive in one hub turn
            assert c.call(1, {})["code"] == 0
        wait_until(lambda: sum(conn.parked for conn in server.connections) == 6)
        conns[0].send(b'{"cmdid":2,"id":1,"params":{"seconds":5}}\n{"cmdid":44,"id":2}\n')
        for c in conns[1:]:
            c.send(b'{"cmdid":2,"id":1,"params":{"seconds":5}}\n{"cmdid":1,"id":2}\n')
        for c in conns:
            c.expect_eof()
        wait_until(lambda: not server.connections and server.inflight == 0 and not server.state.watching)
    finally:
        for c in conns:
            c.close()
    assert hub_errors == []


# -- interrupts and closes of parked / handed-off connections ------------------------------------


@pytest.mark.slow
def test_drain_answers_handoffs_of_parked_connections(serve: Serve, hub_errors: list[Any]) -> None:
    """Stop while a reader is parked and its handed-off request still runs: the reply, then the
    goaway; an idle parked connection gets its goaway at once. (A half-received line: see
    tests/repro_review3.py.)"""
    server = serve(graceful_timeout=5)
    busy = RawConn(server.address)
    idle = RawConn(server.address)
    try:
        busy.send(b'{"cmdid":2,"id":1,"params":{"seconds":0.4}}\n{"cmdid":1,"id":2}\n')
        assert idle.call(1, {})["code"] == 0
        wait_until(lambda: server.inflight == 1 and sum(c.parked for c in server.connections) == 2)
        stopper = gevent.spawn(server.stop, 5)
        assert idle.line()["goaway"] == "shutdown"
        idle.expect_eof()
        assert [busy.line()["id"], busy.line()["id"]] == [1, 2]
        assert busy.line()["goaway"] == "shutdown"
        busy.expect_eof()
        stopper.get(timeout=5)
        assert not server.connections
    finally:
        for c in (busy, idle):
            c.close()
    assert hub_errors == []


def test_write_timeout_of_a_handoff_while_its_reader_is_parked(serve: Serve, hub_errors: list[Any]) -> None:
    """A handed-off reply too big for a peer that reads nothing: the writer is cut, the parked
    reader's watcher is stopped with the socket, and the fd can be reused at once."""
    server = serve(write_timeout=0.3)
    with RawConn(server.address) as c:
        c.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 4096)
        c.send(b'{"cmdid":9,"id":1,"params":{"seconds":0.05,"size":8000000}}\n')
        wait_until(lambda: any(conn.parked and conn.writer is not None for conn in server.connections))
        wait_until(lambda: not server.connections)
        assert server.stats.write_timeout_disconnections == 1
    for _ in range(20):  # fds freed above are reused: no stale watcher may fire into them
        with RawConn(server.address) as c:
            assert c.call(2, {"seconds": 0.01})["code"] == 0
            assert c.call(1, {"n": 1})["data"] == {"n": 1}
    wait_until(lambda: settled(server) and not server.connections)
    assert server.inflight == 0
    assert hub_errors == []


@pytest.mark.slow
def test_parked_connections_closed_every_way_leave_no_stale_watcher(serve: Serve, hub_errors: list[Any]) -> None:
    """Idle timeout, peer RST, peer FIN while parked (fd numbers are reused at once by new ones)."""
    server = serve(idle_timeout=0.2)
    for round_ in range(5):
        timed_out = [RawConn(server.address) for _ in range(10)]
        reset = [RawConn(server.address) for _ in range(10)]
        closed = [RawConn(server.address) for _ in range(10)]
        for c in [*timed_out, *reset, *closed]:
            assert c.call(1, {"r": round_})["data"] == {"r": round_}
        wait_until(lambda: sum(conn.parked for conn in server.connections) >= 30)
        for c in reset:
            rst(c.sock)
        for c in closed:
            c.close()
        for c in timed_out:
            assert c.line(timeout=3)["goaway"] == "idle"
            c.expect_eof()
            c.close()
        wait_until(lambda: not server.connections)
        fresh = [RawConn(server.address) for _ in range(30)]
        try:
            for c in fresh:
                c.send(b'{"cmdid":2,"id":1,"params":{"seconds":0.01}}\n{"cmdid":1,"id":2}\n')
            for c in fresh:
                assert [c.line()["id"], c.line()["id"]] == [1, 2]
        finally:
            for c in fresh:
                c.close()
        wait_until(lambda: not server.connections)
    assert server.inflight == 0 and not server.state.watching
    assert hub_errors == []


def test_slowloris_stop_of_a_parked_reader_waits_for_its_handoff(serve: Serve, hub_errors: list[Any]) -> None:
    """A half line times out while the reader is parked and a handed-off request still runs: its
    reply first, then the 408 line, then the close."""
    server = serve(request_timeout=0.3)
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":2,"id":1,"params":{"seconds":0.6}}\n{"cmdid":1,"id":')
        wait_until(lambda: server.inflight == 1 and any(conn.parked for conn in server.connections))
        assert c.line()["id"] == 1
        assert c.line()["code"] == 408
        c.expect_eof()
    wait_until(lambda: not server.connections)
    assert server.stats.slow_request_disconnections == 1 and server.inflight == 0
    assert hub_errors == []


# -- limits, auth, TLS ---------------------------------------------------------------------------


def test_inflight_refusals_keep_order_with_handoffs(serve: Serve, hub_errors: list[Any]) -> None:
    server = serve(max_inflight_per_connection=2)
    with RawConn(server.address) as c:
        c.send(b"".join(b'{"cmdid":2,"id":%d,"params":{"seconds":0.2}}\n' % i for i in range(5)) +
               b'{"cmdid":1,"id":5}\n')
        assert [(r["id"], r["code"]) for r in (c.line() for _ in range(6))] == \
            [(0, 0), (1, 0), (2, 503), (3, 503), (4, 503), (5, 0)]  # echo never blocks: never refused
        wait_until(lambda: settled(server))
        assert c.call(2, {"seconds": 0.01})["code"] == 0  # the slots were given back
    assert hub_errors == []


def test_server_inflight_limit_refuses_other_connections_while_handoffs_run(serve: Serve) -> None:
    server = serve(max_inflight=2)
    with RawConn(server.address) as a, RawConn(server.address) as b:
        a.send(b'{"cmdid":2,"id":1,"params":{"seconds":0.3}}\n{"cmdid":2,"id":2,"params":{"seconds":0.3}}\n')
        wait_until(lambda: server.inflight == 2)
        assert b.call({"cmdid": 2, "id": 3, "params": {"seconds": 0.01}})["code"] == 503
        assert [a.line()["id"], a.line()["id"]] == [1, 2]
        wait_until(lambda: settled(server))
        assert b.call({"cmdid": 2, "id": 4, "params": {"seconds": 0.01}})["code"] == 0


def test_auth_pipelined_byte_by_byte_with_a_blocking_handler(serve: Serve, hub_errors: list[Any]) -> None:
    server = serve(auth_token="s3cret-token-for-tests")
    with RawConn(server.address) as c:
        c.sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        data = (b'{"cmdid":1,"id":0}\n{"cmdid":-4,"id":1,"params":{"token":"s3cret-token-for-tests"}}\n'
                b'{"cmdid":2,"id":2,"params":{"seconds":0.1}}\n{"cmdid":1,"id":3}\n')
        for i in range(len(data)):
            c.send(data[i:i + 1])
            if i % 7 == 0:
                gevent.sleep(0.001)
        replies = [c.line() for _ in range(4)]
        assert [(r["id"], r["code"]) for r in replies] == [(0, 401), (1, 0), (2, 0), (3, 0)]
    assert hub_errors == []


def test_tls_connection_pipelines_blocks_and_half_closes(hub_errors: list[Any], tmp_path: Any) -> None:
    from geventtcp.tls import client_context
    from tests.support.certs import make_pki

    pki = make_pki(str(tmp_path))
    server = Server(make_registry(), bind="127.0.0.1:0", certfile=pki.server_cert, keyfile=pki.server_key,
                    handler_timeout=0.3)
    server.start()
    try:
        with RawConn.tls(server.address, client_context(ca_certs=pki.ca)) as c:
            data = (b'{"cmdid":2,"id":1,"params":{"seconds":0.1}}\n{"cmdid":1,"id":2}\n'
                    b'{"cmdid":2,"id":3,"params":{"seconds":9}}\n{"cmdid":1,"id":4,"params":{"p":"' +
                    b"z" * 100000 + b'"}}\n')
            for i in range(0, 200, 3):  # the first lines in small TLS records
                c.send(data[i:i + 3])
            c.send(data[200:])
            replies = [c.line() for _ in range(4)]
            assert [(r["id"], r["code"]) for r in replies] == [(1, 0), (2, 0), (3, 504), (4, 0)]
            c.send(b'{"cmdid":2,"id":5,"params":{"seconds":0.1}}\n{"cmdid":1,"id":6}\n')
            assert [c.line()["id"], c.line()["id"]] == [5, 6]
        wait_until(lambda: not server.connections)
        assert server.inflight == 0
    finally:
        server.close()
    assert hub_errors == []


# -- drain and slowloris timing of lines that span reads -------------------------------------


@pytest.mark.slow
def test_drain_answers_a_line_a_parked_connection_had_half_received(serve: Serve) -> None:
    """A drain leaves a parked connection with half a line parked; when the rest arrives the resumed
    reader reads it before it stops: the line is answered, then the goaway comes (as on TLS, whose
    reader waits in ``recv``)."""
    server = serve(graceful_timeout=5)
    with RawConn(server.address) as half:
        half.send(b'{"cmdid":1,"id":"h"')
        wait_until(lambda: any(c.buffer.pending and c.parked for c in server.connections))
        stopper = gevent.spawn(server.stop, 5)
        wait_until(lambda: all(c.goaway for c in server.connections))
        half.send(b',"params":{}}\n')
        first = half.line()
        assert first.get("id") == "h", first
        assert half.line()["goaway"] == "shutdown"
        stopper.get(timeout=5)


@pytest.mark.slow
def test_a_steady_pipeline_is_not_taken_for_a_slowloris(serve: Serve) -> None:
    """Every line completes within milliseconds, but no read ends exactly at a newline: the slowloris
    clock counts from the start of the unfinished line, not from the first read that left one."""
    server = serve(request_timeout=0.5)
    line = b'{"cmdid":1,"id":%d,"params":{"pad":"abcdefghijklmnopqrstuvwxyz"}}\n'
    with RawConn(server.address) as c:
        c.sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        stream = b"".join(line % i for i in range(3000))
        sent = 0
        answered = 0

        def reader() -> None:
            nonlocal answered
            while True:
                reply = c.line(timeout=5)
                assert reply.get("id") == answered, reply
                answered += 1

        reading = gevent.spawn(reader)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and sent < len(stream) and not reading.dead:
            step = 3 * len(line % sent) // 2  # always ends inside a line
            c.send(stream[sent:sent + step])
            sent += step
            gevent.sleep(0.01)
        wait_until(lambda: reading.dead or answered >= stream[:sent].count(b"\n"), timeout=5)
        reading.kill()
        assert reading.exception is None or isinstance(reading.exception, gevent.GreenletExit), \
            f"after {answered} replies: {reading.exception!r}"
        assert server.stats.slow_request_disconnections == 0
