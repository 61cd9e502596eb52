"""Protocol 1.1 on real sockets: HELLO (cmdid -5) and replies in completion order (issue 14).

A connection that sent HELLO with ``"unordered"`` gets the reply to a request carrying an id as soon
as it is ready; an id-less request is a barrier (after every earlier reply, before every later one);
a connection that did not ask is answered byte for byte as before. Drain and goaway still answer
every request read, and the queued-bytes bound holds.
"""

from __future__ import annotations

import json
import os
import socket as stdsocket
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest

from geventtcp import Server
from geventtcp.protocol import Builtin
from tests.support.rawconn import RawConn
from tests.support.servers import queued_bytes
from tests.support.system import wait_until

Serve = Callable[..., Server]
MIB = 1 << 20
HELLO = b'{"cmdid":-5,"id":"h","params":{"protocol":"1.1","features":["unordered"]}}\n'


def _line(cmdid: int, params: dict[str, Any] | None = None, **fields: Any) -> bytes:
    return json.dumps({"cmdid": cmdid, "timestamp": 0, "params": params or {}, **fields}).encode() + b"\n"


def _hello(conn: RawConn) -> dict[str, Any]:
    conn.send(HELLO)
    return conn.line()


def test_hello_reply_states_version_features_pid_and_workers(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as conn:
        conn.send(_line(-5, {"protocol": "1.1", "features": ["unordered", "zstd-from-the-future"]}, id=1))
        assert conn.raw_line() == (b'{"code":0,"cmdid":-5,"id":1,"data":{"protocol":"1.1","features":["unordered"],'
                                   b'"pid":%d,"workers":1}}' % os.getpid())
        (conn_state,) = server.connections
        assert conn_state.unordered
        # A later HELLO cannot switch it off: the features in force are stated.
        assert conn.call(-5, {"features": []}, id=2)["data"]["features"] == ["unordered"]


def test_hello_without_features_keeps_the_connection_ordered(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as conn:
        reply = conn.call(-5, {"protocol": "1.1"}, id=1)
        assert reply["data"]["features"] == [] and reply["data"]["protocol"] == "1.1"
        (conn_state,) = server.connections
        assert not conn_state.unordered
        conn.send(_line(2, {"seconds": 0.2}, id=2) + _line(1, {"k": 3}, id=3))
        assert [conn.line()["id"], conn.line()["id"]] == [2, 3]


@pytest.mark.parametrize("params", [{"features": "unordered"}, {"features": [1]}, {"protocol": 1.1}])
def test_hello_with_params_of_the_wrong_type_is_a_400(serve: Serve, params: dict[str, Any]) -> None:
    server = serve()
    with RawConn(server.address) as conn:
        reply = conn.call(-5, params, id=1)
        assert (reply["code"], reply["cmdid"], reply["id"]) == (400, -5, 1)
        (conn_state,) = server.connections
        assert not conn_state.unordered


def test_hello_is_answered_before_auth(serve: Serve) -> None:
    server = serve(auth_token="s3cret")
    with RawConn(server.address) as conn:
        assert _hello(conn)["data"]["features"] == ["unordered"]
        assert conn.call(1, {}, id=2)["code"] == 401
        assert conn.call(Builtin.AUTH, {"token": "s3cret"}, id=3)["code"] == 0
        conn.send(_line(2, {"seconds": 0.3}, id=4) + _line(1, {"k": 5}, id=5))
        assert [conn.line()["id"], conn.line()["id"]] == [5, 4]


def test_a_slow_request_does_not_delay_a_fast_one(serve: Serve) -> None:
    """Unordered: the echo behind a 0.5 s sleep in the same write comes back first, and at once."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        started = time.monotonic()
        conn.send(_line(2, {"seconds": 0.5}, id=1) + _line(1, {"k": 2}, id=2))
        fast = conn.line()
        fast_at = time.monotonic() - started
        slow = conn.line()
        assert (fast["id"], fast["data"]) == (2, {"k": 2})
        assert (slow["id"], slow["data"]) == (1, {"slept": 0.5})
        assert fast_at < 0.4, fast_at  # not behind the sleep (in order it would take 0.5 s)


def test_slow_requests_come_back_in_completion_order(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        conn.send(_line(2, {"seconds": 0.6}, id="a") + _line(2, {"seconds": 0.05}, id="b")
                  + _line(2, {"seconds": 0.3}, id="c") + _line(1, {}, id="d"))
        assert [conn.line()["id"] for _ in range(4)] == ["d", "b", "c", "a"]


def test_an_id_less_request_is_a_barrier(serve: Serve) -> None:
    """Its reply follows every earlier request's reply and precedes every later one (inline or handed
    off); ``"id": null`` counts as id-less here, and so does a line whose id could not be read."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        conn.send(_line(2, {"seconds": 0.4}, id=1)  # floating
                  + _line(1, {"k": "no id"})  # id-less, inline: waits for id 1
                  + _line(1, {}, id=3)  # after the barrier
                  + _line(2, {"seconds": 0.01}, id=4)  # handed off after the barrier
                  + _line(1, {"k": "null"}, id=None)  # id-less again
                  + b'{"cmdid":1, oops}\n'  # 400 without id: a barrier too
                  + _line(1, {}, id=7))
        replies = [conn.line() for _ in range(7)]
        assert [r.get("id", "-") for r in replies] == [1, "-", 3, 4, "-", "-", 7]  # null is no id
        assert [r["code"] for r in replies] == [0, 0, 0, 0, 0, 400, 0]


def test_an_id_less_handed_off_request_waits_for_earlier_floating_ones(serve: Serve) -> None:
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        conn.send(_line(2, {"seconds": 0.4}, id=1) + _line(2, {"seconds": 0.05})
                  + _line(2, {"seconds": 0.01}, id=3) + _line(1, {}, id=4))
        replies = [conn.line() for _ in range(4)]
        # 3 and 4 both come after the barrier (queued behind it, in completion order among them).
        assert [r.get("id", "-") for r in replies] == [1, "-", 4, 3]


def test_an_ordered_connection_is_unchanged_byte_for_byte(serve: Serve) -> None:
    """Without HELLO, replies keep request order exactly, byte for byte, next to an unordered one."""
    server = serve()
    batch = (_line(2, {"seconds": 0.3}, id=1) + _line(1, {"k": 2}, id=2) + _line(1, {"k": 3})
             + b'{"cmdid":1, oops}\n' + _line(99, {}, id="x") + _line(2, {"seconds": 0.05}, id=None))
    expected = [
        b'{"code":0,"cmdid":2,"id":1,"data":{"slept":0.3}}',
        b'{"code":0,"cmdid":1,"id":2,"data":{"k":2}}',
        b'{"code":0,"cmdid":1,"data":{"k":3}}',
        None,  # the 400's text comes from the JSON parser
        b'{"code":404,"cmdid":99,"id":"x","msg":"unknown cmdid 99"}',
        b'{"code":0,"cmdid":2,"data":{"slept":0.05}}',  # "id": null is no id
    ]
    with RawConn(server.address) as ordered, RawConn(server.address) as unordered:
        _hello(unordered)
        unordered.send(batch)
        ordered.send(batch)
        got = [ordered.raw_line() for _ in expected]
        for line, want in zip(got, expected, strict=True):
            if want is None:
                assert line.startswith(b'{"code":400,"cmdid":null,"msg":"invalid JSON: ')
            else:
                assert line == want
        # Unordered, id 2 overtakes id 1; the id-less echo after them is a barrier behind id 1.
        assert [json.loads(unordered.raw_line()).get("id", "-") for _ in expected] == [2, 1, "-", "-", "x", "-"]


def test_a_pipelined_batch_still_leaves_in_one_send(serve: Serve) -> None:
    """Unordered, a slow request first then 32 echoes in one write: the 32 inline replies leave in
    one send at the end of the batch (not one send each, not behind the slow one), its reply after."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        (state,) = server.connections
        sends: list[int] = []
        raw_send = state._raw_send
        assert raw_send is not None

        def counting(data: Any) -> int:
            sends.append(bytes(data).count(b"\n"))
            return raw_send(data)

        state._raw_send = counting
        conn.send(_line(2, {"seconds": 0.2}, id="slow") + b"".join(_line(1, {"i": i}, id=i) for i in range(32)))
        ids = [conn.line()["id"] for _ in range(33)]
        assert ids == [*range(32), "slow"]
        assert sends == [32, 1]


def test_a_floating_requests_deadline_504_goes_out_when_due(serve: Serve) -> None:
    """The 504 of a request carrying an id is sent at its deadline, not behind anything: here it
    overtakes a slower request read before it."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        started = time.monotonic()
        conn.send(_line(2, {"seconds": 1.0}, id=1) + _line(2, {"seconds": 2.0}, id=2, timeout_ms=200)
                  + _line(1, {}, id=3))
        assert conn.line()["id"] == 3
        late = conn.line()
        assert (late["id"], late["code"]) == (2, 504) and time.monotonic() - started < 0.9
        assert conn.line()["id"] == 1
        wait_until(lambda: server.inflight == 0)


@pytest.mark.slow
def test_drain_answers_every_request_read_on_an_unordered_connection(serve: Serve, hub_errors: list[Any]) -> None:
    """A stop while floating requests run: each read request is answered (in completion order),
    then the goaway, then EOF."""
    server = serve(graceful_timeout=5)
    with RawConn(server.address) as conn:
        _hello(conn)
        conn.send(_line(2, {"seconds": 0.5}, id=1) + _line(2, {"seconds": 0.2}, id=2) + _line(1, {}, id=3))
        assert conn.line()["id"] == 3
        wait_until(lambda: server.inflight == 2)
        stopper = gevent.spawn(server.stop, 5)
        assert [conn.line()["id"], conn.line()["id"]] == [2, 1]
        assert conn.line()["goaway"] == "shutdown"
        conn.expect_eof()
        stopper.get(timeout=5)
    assert hub_errors == []


@pytest.mark.slow
def test_queued_bytes_stay_bounded_on_an_unordered_connection(serve: Serve) -> None:
    """A peer that reads nothing: 24 handed-off requests each finishing with a 1 MiB reply, and 24
    1.5 MiB echo replies; the reader stops at about MAX_QUEUED_BYTES queued, as in order, and every
    reply still arrives once the peer reads."""
    server = serve()
    count = 24
    text = "\U0001f600" * (1 << 17)  # 512 KiB line, 1.5 MiB reply
    peak = {"queued": 0}

    def sample() -> None:
        while True:
            peak["queued"] = max(peak["queued"], queued_bytes(server))
            gevent.sleep(0.005)

    sampler = gevent.spawn(sample)
    conn = RawConn(server.address, timeout=20)
    conn.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 65536)
    try:
        _hello(conn)

        def send_all() -> None:
            for k in range(count):
                conn.send(_line(9, {"seconds": 0.05, "size": MIB}, id=f"s{k}"))
                conn.send(json.dumps({"cmdid": 1, "params": {"s": text}, "id": f"e{k}"},
                                     ensure_ascii=False).encode() + b"\n")

        sender = gevent.spawn(send_all)
        gevent.sleep(1.5)  # the peer reads nothing meanwhile
        seen = set()
        for _ in range(2 * count):
            reply = conn.line(timeout=20)
            assert reply["code"] == 0
            seen.add(reply["id"])
        assert seen == {f"s{k}" for k in range(count)} | {f"e{k}" for k in range(count)}
        sender.get(timeout=10)
    finally:
        sampler.kill()
        conn.close()
    assert peak["queued"] <= MIB + 2 * (3 * MIB // 2 + 128), f"{peak['queued'] / MIB:.1f} MiB queued"


def test_an_id_in_flight_reused_on_an_unordered_connection_is_refused_after_the_first_reply(serve: Serve) -> None:
    """Protocol 1.1's rule for duplicate ids: in completion order a second request with the id of one
    still in flight would race it, and two replies with one id cannot be told apart. It is refused
    (400, not run), and its refusal comes after the first request's reply. Before, both ran and the
    fast duplicate's reply came first."""
    server = serve()
    with RawConn(server.address) as conn:
        assert _hello(conn)["code"] == 0
        conn.send(_line(2, {"seconds": 0.3}, id="x") + _line(1, {"k": 1}, id="x") + _line(1, {"k": 2}, id="y"))
        first, second, third = conn.line(), conn.line(), conn.line()
        assert first == {"code": 0, "cmdid": 1, "id": "y", "data": {"k": 2}}  # not behind the refusal: at once
        assert second == {"code": 0, "cmdid": 2, "id": "x", "data": {"slept": 0.3}}
        assert third == {"code": 400, "cmdid": 1, "id": "x", "msg": "id already in flight on this connection"}
        conn.send(_line(1, {"k": 3}, id="x"))  # answered: the id is free again
        assert conn.line() == {"code": 0, "cmdid": 1, "id": "x", "data": {"k": 3}}
        assert server.stats.protocol_errors == 1


def test_a_bad_line_reusing_an_id_in_flight_is_answered_after_the_first_reply(serve: Serve) -> None:
    """Review round 3: a line refused as invalid (400) whose id the server recovered, reusing the id of
    a floating request, was answered at once: two replies with id "x", the refusal first, so a client
    matching by id took the 400 for the slow request's reply. Like the duplicate-id refusal, it now
    waits behind the first request's reply."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        conn.send(_line(2, {"seconds": 0.3}, id="x")
                  + b'{"cmdid":1,"params":[],"id":"x"}\n'  # params not an object: 400, id recovered
                  + b'{"cmdid":1,"params":{"s":"\\ud800"},"id":"x"}\n'  # lone surrogate: 400, id recovered
                  + _line(1, {"k": 1}, id="y"))
        replies = [conn.line() for _ in range(4)]
        # "y" at once (it follows no id-less request), the refusals right after the first "x" reply
        assert [(r["id"], r["code"]) for r in replies] == [("y", 0), ("x", 0), ("x", 400), ("x", 400)]
        assert server.stats.protocol_errors == 2


def test_replies_ready_before_an_auth_lockout_are_not_held_behind_requests_in_flight(serve: Serve) -> None:
    """Review (rv-server): the third failed AUTH stops reading (``close_after_replies``) in the middle of
    a batch; the replies already queued (the HELLO's, the AUTH's, a fast echo's, the 401s) then waited
    until the last request in flight had finished, though they were ready: here a 1 s sleep held the
    echo that overtakes it in completion order, and the 401s with it."""
    server = serve(auth_token="s3cret")
    with RawConn(server.address) as conn:
        started = time.monotonic()
        conn.send(HELLO + _line(Builtin.AUTH, {"token": "s3cret"}, id=0) + _line(2, {"seconds": 1.0}, id=1)
                  + _line(1, {"k": 2}, id=2)
                  + b"".join(_line(Builtin.AUTH, {"token": "wrong"}, id=f"a{k}") for k in range(3))
                  + _line(1, {"k": 9}, id=9))  # read after the lockout: never processed
        early = [conn.line() for _ in range(6)]
        early_at = time.monotonic() - started
        assert [r["id"] for r in early] == ["h", 0, 2, "a0", "a1", "a2"]
        assert [r["code"] for r in early] == [0, 0, 0, 401, 401, 401]
        assert early_at < 0.8, early_at  # not behind the 1 s sleep
        assert conn.line() == {"code": 0, "cmdid": 2, "id": 1, "data": {"slept": 1.0}}
        assert conn.line()["goaway"] == "auth_failed"
        conn.expect_eof()


def test_an_id_less_request_does_not_hold_earlier_replies_in_request_order(serve: Serve) -> None:
    """Review (rv-server): the spec lets each reply carrying an id leave when ready and makes an
    id-less request wait for every earlier one, so a 504 read before the id-less request leaves at its
    deadline. The server put the earlier requests' slots in request order ahead of the id-less reply
    instead: the 504 due at 150 ms waited for the 1 s request read before it."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        started = time.monotonic()
        conn.send(_line(2, {"seconds": 1.0}, id=1) + _line(2, {"seconds": 2.0}, id=2, timeout_ms=150)
                  + _line(2, {"seconds": 0.05}, id=3) + _line(1, {"k": "barrier"}) + _line(1, {}, id=5))
        first, second = conn.line(), conn.line()
        assert [(first["id"], first["code"]), (second["id"], second["code"])] == [(3, 0), (2, 504)]
        assert time.monotonic() - started < 0.8  # not behind the 1 s request
        assert [r.get("id", "-") for r in (conn.line(), conn.line(), conn.line())] == [1, "-", 5]
        wait_until(lambda: server.inflight == 0)


def test_an_id_in_flight_behind_an_id_less_request_is_still_refused(serve: Serve) -> None:
    """Review (rv-server): the spec refuses a request reusing the id of one still unanswered on a
    completion-order connection; once an id-less request had been read, the earlier request's id was
    forgotten and the duplicate ran (two replies "x", both code 0)."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        conn.send(_line(2, {"seconds": 0.3}, id="x") + _line(1, {"k": "barrier"}) + _line(1, {"k": 1}, id="x"))
        replies = [conn.line() for _ in range(3)]
        assert [(r.get("id", "-"), r["code"]) for r in replies] == [("x", 0), ("-", 0), ("x", 400)]
        assert replies[2]["msg"] == "id already in flight on this connection"


def test_a_large_id_less_reply_behind_an_opened_gate_is_sent(serve: Serve) -> None:
    """The gate an id-less reply waits behind opens as an empty item in the output queue: a large
    reply right behind it (over the one-send chunk) must still go out once the gate opens, here a
    1.5 MiB id-less echo behind a floating request with a 1.5 MiB reply of its own."""
    server = serve()
    text = "\U0001f600" * (1 << 17)  # a 512 KiB line, a 1.5 MiB reply
    with RawConn(server.address, timeout=10) as conn:
        _hello(conn)
        conn.send(_line(9, {"seconds": 0.2, "size": 3 * MIB // 2}, id=1)
                  + json.dumps({"cmdid": 1, "params": {"s": text}}, ensure_ascii=False).encode() + b"\n"
                  + _line(1, {"k": "after"}, id=3))
        first, second, third = conn.line(), conn.line(), conn.line()
        assert (first["id"], len(first["data"])) == (1, 3 * MIB // 2)
        assert "id" not in second and second["data"] == {"s": text}
        assert third == {"code": 0, "cmdid": 1, "id": 3, "data": {"k": "after"}}


@pytest.mark.parametrize("reuse", [
    _line(1, {"k": "dup"}, id="x"),  # refused: id in flight
    b'{"cmdid":1,"params":[],"id":"x"}\n',  # invalid for another reason, its id recovered
], ids=["duplicate", "bad-line"])
def test_a_refused_reuse_of_an_id_holds_only_behind_that_ids_reply(serve: Serve, reuse: bytes) -> None:
    """Review (rv-gate): a 400 carrying the id of a floating request must follow that request's reply,
    and nothing more: a reply carrying an id leaves when ready unless read after an id-less (or
    pre-HELLO) request still unanswered (docs/protocol.md, deadlines in completion order). The refusal
    was queued as a barrier behind every floating request, so the fast echo read after it (id "f") and
    the refusal itself waited for the unrelated 1 s request "a"."""
    server = serve()
    with RawConn(server.address) as conn:
        _hello(conn)
        started = time.monotonic()
        conn.send(_line(2, {"seconds": 1.0}, id="a") + _line(2, {"seconds": 0.1}, id="x") + reuse
                  + _line(1, {"k": "fast"}, id="f"))
        early = [conn.line() for _ in range(3)]
        early_at = time.monotonic() - started
        assert [(r["id"], r["code"]) for r in early] == [("f", 0), ("x", 0), ("x", 400)]
        assert early_at < 0.7, early_at  # not behind the 1 s request "a"
        assert (conn.line()["id"]) == "a"
        wait_until(lambda: server.inflight == 0)


def test_held_refusals_keep_the_barrier_rule_and_their_bound(serve: Serve) -> None:
    """The refusals held after a floating request's reply still come before an id-less reply read
    after them, and after one read before them; past MAX_HELD_REPLIES a peer reusing an id on purpose
    gets them queued behind a barrier instead (each still after the first reply, each answered once)."""
    from geventtcp.server.connection import MAX_HELD_REPLIES

    server = serve()
    dup = _line(1, {"k": "dup"}, id="x")
    with RawConn(server.address, timeout=10) as conn:
        _hello(conn)
        conn.send(_line(2, {"seconds": 0.2}, id="x") + dup + _line(1, {"k": "barrier"}) + dup + _line(1, {}, id="f"))
        replies = [conn.line() for _ in range(5)]
        assert [(r.get("id", "-"), r["code"]) for r in replies] == [
            ("x", 0), ("x", 400), ("-", 0), ("x", 400), ("f", 0)]
        many = MAX_HELD_REPLIES + 8
        conn.send(_line(2, {"seconds": 0.2}, id="x") + dup * many + _line(1, {}, id="g"))
        replies = [conn.line() for _ in range(many + 2)]
        assert [(r["id"], r["code"]) for r in replies] == [("x", 0)] + [("x", 400)] * many + [("g", 0)]
        wait_until(lambda: server.inflight == 0)
