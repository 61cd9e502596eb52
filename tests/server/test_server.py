"""The server over real loopback sockets: replies, error replies, ordering, concurrency, limits, drain."""

from __future__ import annotations

import json
import logging
import os
import socket as stdsocket
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest

from geventtcp import Server
from geventtcp.protocol import Builtin
from geventtcp.server.connection import Connection
from tests.support.rawconn import RawConn
from tests.support.system import wait_until

Serve = Callable[..., Server]


def test_echo_with_and_without_id(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 1, "params": {"a": 1}, "id": 7}) == {"code": 0, "cmdid": 1, "id": 7, "data": {"a": 1}}
        assert c.call({"cmdid": 1, "params": {"b": 2}}) == {"code": 0, "cmdid": 1, "data": {"b": 2}}
        assert c.call({"cmdid": 1, "id": "s"})["id"] == "s"


def test_seed_client_format_works_unchanged(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":1,"timestamp":1700000000,"params":{"name":"seed"}}\n')
        assert c.line() == {"code": 0, "cmdid": 1, "data": {"name": "seed"}}


def test_request_fields_reach_the_handler(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        line = b'{"cmdid":8,"timestamp":123,"id":4}\r\n'
        data = c.call(line)["data"]
        assert data["id"] == 4 and data["timestamp"] == 123 and data["raw"] == '{"cmdid":8,"timestamp":123,"id":4}'
        assert data["address"][0] == "127.0.0.1"


ERROR_CASES = [
    (b"this is not json\n", 400, None),
    (b"[1,2,3]\n", 400, None),
    (b'{"cmdid":1,"params":{"s":"\xff\xfe"}}\n', 400, None),
    (b'{"params":{}}\n', 400, None),
    (b'{"cmdid":"one"}\n', 400, None),  # an invalid cmdid is never echoed as sent (issue 10, item 18)
    (b'{"cmdid":1,"params":"x","id":5}\n', 400, 1),
    (b'{"cmdid":999,"id":6}\n', 404, 999),
    (b'{"cmdid":3,"id":8}\n', 500, 3),
    (b'{"cmdid":4,"id":9}\n', 500, 4),
    (b'{"cmdid":5}\n', 1005, 5),  # HandlerError("no such user", Code.NOT_FOUND)
]


@pytest.mark.parametrize(("line", "code", "cmdid"), ERROR_CASES)
def test_bad_input_gets_an_error_reply_and_the_connection_stays_usable(
    serve: Serve, line: bytes, code: int, cmdid: Any
) -> None:
    server = serve()
    with RawConn(server.address) as c:
        reply = c.call(line)
        assert reply["code"] == code and reply["cmdid"] == cmdid and reply["msg"]
        sent = json.loads(line) if line.startswith(b"{") and b"\xff" not in line else {}
        assert ("id" in reply) == ("id" in sent)
        assert c.call({"cmdid": 1, "params": {"still": "works"}})["data"] == {"still": "works"}


def test_handler_traceback_is_logged_never_sent(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    server = serve()
    with caplog.at_level(logging.ERROR, logger="geventtcp.server"), RawConn(server.address) as c:
        reply = c.call({"cmdid": 3, "id": 1})
    assert reply == {"code": 500, "cmdid": 3, "id": 1, "msg": "internal error"}
    assert "secret traceback detail" in caplog.text and "Traceback" in caplog.text


def test_blank_lines_get_no_reply(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        c.send(b"\n\r\n   \n\t\r\n")
        assert c.call({"cmdid": 1, "id": 1})["id"] == 1


def test_too_long_line_gets_413_and_the_connection_stays_usable(serve: Serve) -> None:
    server = serve(max_line_bytes=1024)
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":1,"params":{"s":"' + b"x" * 5000 + b'"}}\n')
        reply = c.line()
        assert reply["code"] == 413 and reply["cmdid"] is None
        assert c.call({"cmdid": 1, "id": 2})["id"] == 2
        exact = b'{"cmdid":1,"params":{"s":"' + b"y" * (1024 - 30) + b'"}}\n'
        assert len(exact) == 1024
        assert c.call(exact)["code"] == 0


def test_oversized_reply_is_replaced_by_413(serve: Serve) -> None:
    server = serve(max_reply_bytes=1000)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 7, "params": {"size": 5000}, "id": 1}) == {
            "code": 413, "cmdid": 7, "id": 1, "msg": "reply too large"}
        assert c.call({"cmdid": 7, "params": {"size": 10}})["data"] == "x" * 10


def test_10000_pipelined_requests_in_one_write_come_back_in_order_in_batches(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends: list[int] = []
    original_init = Connection.__init__

    def counting_init(self: Connection, *args: Any) -> None:
        original_init(self, *args)
        raw_send = self._raw_send
        assert raw_send is not None

        def counting_send(data: Any) -> int:
            sends.append(len(data))
            return raw_send(data)

        self._raw_send = counting_send

    monkeypatch.setattr(Connection, "__init__", counting_init)
    server = serve()
    n = 10000
    payload = b"".join(json.dumps({"cmdid": 1, "id": i, "params": {"i": i}}).encode() + b"\n" for i in range(n))
    with RawConn(server.address, timeout=30) as c:
        c.send(payload)
        ids = [c.line()["id"] for _ in range(n)]
    assert ids == list(range(n))
    assert len(sends) < n / 20, f"{len(sends)} sends for {n} replies: replies are not batched"


def test_slow_request_does_not_block_the_connection_and_order_holds(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        start = time.monotonic()
        lines = [{"cmdid": 2, "id": i, "params": {"seconds": 0.3}} for i in range(10)]
        lines.insert(5, {"cmdid": 1, "id": "fast"})
        c.send(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        got = [c.line()["id"] for _ in range(11)]
        elapsed = time.monotonic() - start
    assert got == [0, 1, 2, 3, 4, "fast", 5, 6, 7, 8, 9]
    assert elapsed < 2.0, f"10 sleeps of 0.3 s on one connection took {elapsed:.2f}s: not concurrent"


def test_100_connections_with_sleeping_handlers_run_concurrently(serve: Serve) -> None:
    server = serve()
    conns = [RawConn(server.address) for _ in range(100)]
    start = time.monotonic()
    for i, c in enumerate(conns):
        c.send(json.dumps({"cmdid": 2, "id": i, "params": {"seconds": 0.2}}).encode() + b"\n")
    replies = [c.line() for c in conns]
    elapsed = time.monotonic() - start
    assert [r["id"] for r in replies] == list(range(100)) and all(r["code"] == 0 for r in replies)
    assert elapsed < 5.0, f"100 x 0.2 s took {elapsed:.2f}s (a serial server takes 20 s)"
    for c in conns:
        c.close()


def test_request_deadline_replies_504_and_the_connection_lives_on(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        start = time.monotonic()
        reply = c.call({"cmdid": 2, "id": 1, "timeout_ms": 150, "params": {"seconds": 5}})
        assert reply["code"] == 504 and reply["id"] == 1
        assert 0.1 < time.monotonic() - start < 1.5
        assert c.call({"cmdid": 1, "id": 2})["code"] == 0
    wait_until(lambda: server.inflight == 0)


def test_default_handler_timeout(serve: Serve) -> None:
    server = serve(handler_timeout=0.2)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 2, "params": {"seconds": 5}})["code"] == 504


def test_in_flight_limit_per_connection_answers_retryable_503(serve: Serve) -> None:
    server = serve(max_inflight_per_connection=2)
    with RawConn(server.address) as c:
        c.send(b"".join(json.dumps({"cmdid": 2, "id": i, "params": {"seconds": 0.3}}).encode() + b"\n"
                        for i in range(4)))
        replies = [c.line() for _ in range(4)]
    assert [r["id"] for r in replies] == [0, 1, 2, 3]
    assert [r["code"] for r in replies] == [0, 0, 503, 503]
    assert "in flight" in replies[2]["msg"]


def test_max_connections_rejects_with_a_line_instead_of_hanging(serve: Serve) -> None:
    server = serve(max_connections=3)
    kept = [RawConn(server.address) for _ in range(3)]
    for c in kept:
        assert c.call({"cmdid": 1})["code"] == 0
    with RawConn(server.address, timeout=3) as extra:
        reply = extra.line()
        assert reply["code"] == 503 and "max number of connections" in reply["msg"]
        assert extra.at_eof()
    assert server.stats.connections_rejected == 1
    kept[0].close()
    wait_until(lambda: len(server.connections) == 2)
    with RawConn(server.address) as again:
        assert again.call({"cmdid": 1})["code"] == 0
    for c in kept[1:]:
        c.close()


def test_idle_connection_gets_goaway_then_eof(serve: Serve) -> None:
    server = serve(idle_timeout=0.3)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 1})["code"] == 0
        start = time.monotonic()
        goaway = c.line()
        assert goaway["goaway"] == "idle" and goaway["code"] == 503
        assert c.at_eof()
        assert 0.2 < time.monotonic() - start < 2.0


def test_busy_connection_is_not_idle(serve: Serve) -> None:
    server = serve(idle_timeout=0.2)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 2, "params": {"seconds": 0.6}})["code"] == 0


def test_unfinished_request_line_times_out_with_408(serve: Serve) -> None:
    server = serve(request_timeout=0.3)
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":1,')
        reply = c.line()
        assert reply["code"] == 408 and "not completed" in reply["msg"]
        assert c.at_eof()


def test_client_half_close_still_gets_replies(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":2,"id":1,"params":{"seconds":0.2}}\n{"cmdid":1,"id":2}\n')
        c.sock.shutdown(stdsocket.SHUT_WR)
        assert [c.line()["id"], c.line()["id"]] == [1, 2]
        assert c.at_eof()
    wait_until(lambda: not server.connections)


@pytest.mark.slow
def test_graceful_stop_answers_in_flight_then_goaway(serve: Serve) -> None:
    server = serve()
    busy = RawConn(server.address)
    idle = RawConn(server.address)
    assert idle.call({"cmdid": 1})["code"] == 0
    busy.send(b'{"cmdid":2,"id":1,"params":{"seconds":0.4}}\n')
    wait_until(lambda: server.inflight == 1)
    stopper = gevent.spawn(server.stop, 5)
    assert idle.line()["goaway"] == "shutdown" and idle.at_eof()
    assert busy.line() == {"code": 0, "cmdid": 2, "id": 1, "data": {"slept": 0.4}}
    assert busy.line()["goaway"] == "shutdown" and busy.at_eof()
    stopper.get(timeout=5)
    with pytest.raises(OSError):
        RawConn(server.address, timeout=1).call({"cmdid": 1})


def test_stop_after_graceful_timeout_closes_stragglers(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":2,"params":{"seconds":30}}\n')
        wait_until(lambda: server.inflight == 1)
        start = time.monotonic()
        server.stop(timeout=0.3)
        assert time.monotonic() - start < 2
        assert c.at_eof()


def test_context_manager_and_port_zero() -> None:
    from tests.support.apps import make_registry

    with Server(make_registry(), bind="127.0.0.1:0", graceful_timeout=1) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        assert server.addresses == [f"127.0.0.1:{port}"]
        with RawConn(server.address) as c:
            assert c.call({"cmdid": 1})["code"] == 0
    assert not server.started


def test_unix_socket_listener(serve: Serve, tmp_path: Any) -> None:
    path = str(tmp_path / "g.sock")
    server = serve(bind=[f"unix:{path}", "127.0.0.1:0"])
    assert server.addresses[0] == f"unix:{path}"
    with RawConn(path) as c:
        assert c.call({"cmdid": 1, "id": 1})["id"] == 1
    assert os.path.exists(path)


def test_builtin_ping_and_list(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        ping = c.call({"cmdid": -1})["data"]
        assert ping["pong"] is True and ping["draining"] is False and ping["pid"] == os.getpid()
        listed = c.call({"cmdid": -2})["data"]
        assert [item["cmdid"] for item in listed] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21]
        assert listed[0]["name"] == "echo"


def test_stats_count_requests_and_errors(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        for _ in range(3):
            c.call({"cmdid": 1})
        c.call({"cmdid": 3})
        stats = c.call({"cmdid": -3})["data"]
    assert stats["commands"]["1"]["count"] == 3 and stats["commands"]["1"]["errors"] == 0
    assert stats["commands"]["3"]["errors"] == 1
    assert stats["connections"] == 1 and stats["pid"] == os.getpid()


@pytest.mark.slow
def test_half_close_with_a_large_reply_in_flight_still_delivers_every_reply(serve: Serve) -> None:
    """A handed-off greenlet still sending a big reply must not be cut off by the close."""
    server = serve()
    with RawConn(server.address, timeout=20) as c:
        c.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 65536)
        c.send(b'{"cmdid":9,"id":1,"params":{"seconds":0.1,"size":8000000}}\n'
               b'{"cmdid":9,"id":2,"params":{"seconds":0.3,"size":10}}\n')
        c.sock.shutdown(stdsocket.SHUT_WR)
        gevent.sleep(0.8)  # be a slow reader: both handlers finish while reply 1 is still being sent
        first, second = c.line(), c.line()
        assert (first["id"], len(first["data"])) == (1, 8000000)
        assert second == {"code": 0, "cmdid": 9, "id": 2, "data": "x" * 10}
        assert c.at_eof()


@pytest.mark.slow
def test_drain_waits_for_a_large_reply_to_a_slow_reader(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address, timeout=20) as c:
        c.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 65536)
        c.send(b'{"cmdid":9,"id":1,"params":{"seconds":0.05,"size":8000000}}\n')
        wait_until(lambda: server.inflight == 1)
        (conn,) = server.connections
        wait_until(lambda: conn.flushing)  # the handler is done; its greenlet is stuck sending
        stopper = gevent.spawn(server.stop, 10)
        gevent.sleep(0.5)
        reply = c.line()
        assert reply["id"] == 1 and len(reply["data"]) == 8000000
        assert c.line()["goaway"] == "shutdown" and c.at_eof()
        stopper.get(timeout=10)


@pytest.mark.slow
def test_slow_but_steady_reader_is_not_dropped_by_write_timeout(serve: Serve) -> None:
    server = serve(write_timeout=0.5)
    with RawConn(server.address, timeout=20) as c:
        c.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 65536)
        c.send(b'{"cmdid":7,"id":1,"params":{"size":12000000}}\n')  # more than the kernel buffers
        received = b""
        while not received.endswith(b"\n"):
            chunk = c.sock.recv(256 * 1024)
            assert chunk, f"dropped after {len(received)} bytes although the reader kept reading"
            received += chunk
            gevent.sleep(0.05)  # a few MB/s: the whole reply takes several write_timeouts
        assert json.loads(received)["id"] == 1
        assert server.stats.write_timeout_disconnections == 0


def test_deadline_counts_from_when_the_line_was_read(serve: Serve) -> None:
    """A request queued behind CPU-bound work past its deadline is refused without running."""
    server = serve()
    with RawConn(server.address) as c:
        c.send(b'{"cmdid":6,"id":1,"params":{"seconds":0.3}}\n{"cmdid":1,"id":2,"timeout_ms":100}\n')
        assert c.line()["data"] == "spun"
        late = c.line()
        assert late["code"] == 504 and late["id"] == 2 and "before the request started" in late["msg"]


def test_oversized_timeout_ms_is_a_400_not_a_dead_connection(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as c:
        reply = c.call(b'{"cmdid":1,"id":1,"timeout_ms":1' + b"0" * 400 + b"}\n")
        assert reply["code"] == 400 and reply["id"] == 1 and "timeout_ms" in reply["msg"]
        assert c.call({"cmdid": 1, "id": 2, "timeout_ms": 2**31 - 1})["code"] == 0


def test_distinct_unknown_cmdids_do_not_grow_the_stats(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address, timeout=30) as c:
        c.send(b"".join(b'{"cmdid":%d}\n' % (1000 + i) for i in range(5000)))
        assert all(c.line()["code"] == 404 for _ in range(5000))
    assert server.stats.unknown_commands == 5000
    assert not any(cmdid >= 1000 for cmdid in server.stats.commands)


def test_handler_calling_sys_exit_gets_500_and_the_server_lives(serve: Serve) -> None:
    from tests.support.apps import make_registry

    registry = make_registry()

    def leave(req: Any) -> Any:
        raise SystemExit("bye")

    registry.add(50, leave)
    server = serve(registry)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 50, "id": 1}) == {"code": 500, "cmdid": 50, "id": 1, "msg": "internal error"}
        assert c.call({"cmdid": 1, "id": 2})["code"] == 0
    with RawConn(server.address) as again:
        assert again.call({"cmdid": 1})["code"] == 0


def test_a_hook_that_yields_after_the_handler_cannot_trigger_a_stray_deadline(
    serve: Serve, hub_errors: list[Any]
) -> None:
    """Once the handler returned, no handoff or deadline timer may attach to the reader any more."""
    server = serve(handler_timeout=0.05)
    server.access_log = lambda conn, req, code, seconds: gevent.sleep(0.01)  # e.g. a network log handler
    with RawConn(server.address) as c:
        for i in range(20):
            assert c.call({"cmdid": 1, "id": i})["id"] == i
        # Any stray 0.05 s timer fires first: the hub runs expired timers in deadline order, so this
        # 0.2 s sleep cannot return before them, however loaded the host.
        gevent.sleep(0.2)
        assert c.call({"cmdid": 1, "id": "after"})["id"] == "after"
    assert server.inflight == 0
    assert hub_errors == [], f"stray exceptions in the hub: {hub_errors!r}"


def test_one_hub_callback_hands_off_each_blocked_connection(serve: Callable[..., Server],
                                                           caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Handlers that block in the same hub turn are handed off by one callback; a handoff that fails
    costs only its own connection (closed), never the others'."""
    server = serve()
    conns = [RawConn(server.address) for _ in range(3)]
    try:
        for c in conns:
            assert c.call(1, {})["code"] == 0
        wait_until(lambda: len(server.connections) == 3)
        doomed_peer = conns[0].sock.getsockname()
        doomed = next(conn for conn in server.connections if conn.address == doomed_peer)

        hand_off = Connection.hand_off

        def broken_for_doomed(conn: Connection) -> None:  # a Connection has no __dict__: patch the class
            if conn is doomed:
                raise RuntimeError("handoff bug")
            hand_off(conn)

        monkeypatch.setattr(Connection, "hand_off", broken_for_doomed)
        for c in conns:  # all three lines arrive before the server runs: one hub turn
            c.send(b'{"cmdid":2,"id":1,"params":{"seconds":0.3}}\n{"cmdid":1,"id":2,"params":{}}\n')
        wait_until(lambda: server.inflight == 2)  # both healthy sleeps handed off at once
        for c in conns[1:]:
            assert [c.line()["id"], c.line()["id"]] == [1, 2]
        conns[0].expect_eof()
        assert "handoff failed" in caplog.text
    finally:
        for c in conns:
            c.close()


class _FakeWatched:
    """Stands in for a Connection in ``Server.watching``: ``_watch`` runs ``action``."""

    def __init__(self, action: Callable[[], None], running: Any = True) -> None:
        self.address = ("127.0.0.1", 0)
        self.running = running
        self.watch_armed = True
        self.action = action
        self.aborted = False

    def hand_off(self) -> None:
        self.watch_armed = False
        self.action()

    def abort(self) -> None:
        self.aborted = True


def test_a_watch_pass_cut_short_by_an_exception_puts_the_rest_back(serve: Callable[..., Server]) -> None:
    class Boom(BaseException):
        pass

    def boom() -> None:
        raise Boom

    server = serve()
    first, rest = _FakeWatched(boom), _FakeWatched(lambda: None)
    server.state.watching = [first, rest]  # type: ignore[list-item]
    with pytest.raises(Boom):
        server.state.watch_all()
    assert server.state.watching == [rest]  # type: ignore[comparison-overlap]  # not dropped with its watch armed: a new pass is queued
    wait_until(lambda: not server.state.watching and not rest.watch_armed)


def test_a_long_watch_pass_lets_the_hub_poll(serve: Callable[..., Server]) -> None:
    """Past the switch interval, a pass stops every 50 handoffs and leaves the rest to the next turn."""
    calls: list[int] = []

    def slow_handoff() -> None:
        calls.append(1)
        end = time.monotonic() + 0.0005  # 50 of these: past the 5 ms switch interval
        while time.monotonic() < end:
            pass

    server = serve()
    fakes = [_FakeWatched(slow_handoff) for _ in range(120)]
    server.state.watching = list(fakes)  # type: ignore[arg-type]
    server.state.watch_all()
    assert len(calls) == 50 and server.state.watching == fakes[50:]  # type: ignore[comparison-overlap]
    wait_until(lambda: len(calls) == 120 and not server.state.watching)
    assert not any(f.watch_armed for f in fakes)


def test_set_builtin_and_begin_drain_are_how_a_launcher_changes_a_running_server(serve: Callable[..., Server]) -> None:
    """The launcher's two operations on a running server: a replaced built-in answers at once and
    again after a restart; once a drain is begun (before the stop), a parked connection that sends
    again gets a goaway instead of its request being read."""
    server = serve()
    server.set_builtin(Builtin.STATS, lambda req: {"merged": True})
    with RawConn(server.address) as c:
        assert c.call(Builtin.STATS, {})["data"] == {"merged": True}
        server.close()
        server.start()  # the command tables are rebuilt: the replacement stays
        assert server.calls[Builtin.STATS](None) == {"merged": True}  # type: ignore[arg-type]
    with RawConn(server.address) as c:
        assert c.call(Builtin.PING, {})["data"]["draining"] is False
        server.begin_drain("reload")
        assert server.draining and server.drain_reason == "reload"
        c.send(b'{"cmdid":%d,"id":1}\n' % Builtin.PING)
        assert c.line().get("goaway") == "reload"  # the PING was not read: resend it elsewhere
        c.expect_eof()
