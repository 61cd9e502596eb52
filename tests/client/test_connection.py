"""One multiplexed connection against servers that misbehave on purpose (raw fake servers and a fault proxy)."""

import json
import time

import gevent
import pytest
from gevent import socket as gsocket

from geventtcp.client import connection as clientconn
from geventtcp.client.client import Client
from geventtcp.errors import CallTimeout, DeadlineExceeded, MaybeExecuted, NotSent, RemoteError, Unprocessed
from tests.support import client_app
from tests.support.faults import FakeServer, FaultProxy
from tests.support.servers import ServerProcess, addr, serve
from tests.support.system import in_thread, wait_until


def reply_for(line: bytes, data=None, **extra) -> bytes:
    req = json.loads(line)
    body = {"code": 0, "cmdid": req["cmdid"], "id": req["id"], "data": req["params"] if data is None else data}
    body.update(extra)
    return json.dumps(body).encode() + b"\n"


def test_replies_out_of_order_reach_their_own_callers():
    """Replies matched by id, not by order: the fake server answers a batch of 20 in reverse."""

    def behaviour(server, sock, n):
        buf: list[bytes] = []
        while True:
            batch = [server.read_line(sock, buf) for _ in range(20)]
            if None in batch:
                return
            sock.sendall(b"".join(reply_for(line) for line in reversed(batch)))

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            jobs = [gevent.spawn(client.call, 1, {"i": i}) for i in range(40)]
            gevent.joinall(jobs, raise_error=True)
            assert [job.value for job in jobs] == [{"i": i} for i in range(40)]
        assert fake.accepted == 1
    finally:
        fake.close()


def test_request_carries_id_and_remaining_timeout():
    def behaviour(server, sock, n):
        buf: list[bytes] = []
        while (line := server.read_line(sock, buf)) is not None:
            sock.sendall(reply_for(line))

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=2.0) as client:
            client.call(7, {"x": 1})
            client.call(7, {"x": 2}, timeout=0.5)
        first, second = (json.loads(line) for line in fake.lines)
        assert first["id"] != second["id"]
        assert 1800 <= first["timeout_ms"] <= 2000  # the remaining time, minus a margin for the 504
        assert 400 <= second["timeout_ms"] <= 500
        assert second["params"] == {"x": 2} and second["cmdid"] == 7
    finally:
        fake.close()


@pytest.mark.parametrize("bad", [b"this is not json\n", b'{"code":0,"cmdid":1,"id":999,"data":1}\n', b"[1]\n"])
def test_unreadable_or_unknown_reply_discards_the_connection(bad):
    """Desync (garbage, a reply for an id never sent): MaybeExecuted, the connection is dropped, the
    next call works on a new one."""

    def behaviour(server, sock, n):
        buf: list[bytes] = []
        while (line := server.read_line(sock, buf)) is not None:
            sock.sendall(bad if n == 0 else reply_for(line))

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=2, retries=0) as client:
            with pytest.raises(MaybeExecuted) as info:
                client.call(4, {"tag": "a"})
            assert not isinstance(info.value, CallTimeout)
            assert client.call(4, {"tag": "b"}) == {"tag": "b"}
        assert fake.accepted == 2
    finally:
        fake.close()


def test_reply_cut_mid_line_is_never_parsed():
    def behaviour(server, sock, n):
        line = server.read_line(sock, [])
        whole = reply_for(line)
        sock.sendall(whole[: len(whole) // 2])  # then close: limit_data inside the reply line

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=2, retries=0) as client, pytest.raises(MaybeExecuted):
            client.call(4, {"tag": "cut"})
    finally:
        fake.close()


def test_goaway_fails_unanswered_requests_as_unprocessed_and_they_are_resent():
    """A non-idempotent call under a goaway is sent again (the server said it did not run it)."""

    def behaviour(server, sock, n):
        buf: list[bytes] = []
        line = server.read_line(sock, buf)
        if n == 0:
            sock.sendall(b'{"code":503,"cmdid":null,"goaway":"shutdown","msg":"server is going away"}\n')
            return
        while line is not None:
            sock.sendall(reply_for(line, data="ran"))
            line = server.read_line(sock, buf)

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=2) as client:
            assert client.call(4, {"tag": "x"}) == "ran"
        with Client(fake.address, timeout=2, retries=0) as client:
            fake.accepted = 0
            with pytest.raises(Unprocessed):
                client.call(4, {"tag": "y"})
    finally:
        fake.close()


def test_connection_lost_after_write_is_maybe_executed_and_retried_only_if_idempotent():
    def behaviour(server, sock, n):
        buf: list[bytes] = []
        line = server.read_line(sock, buf)
        if n == 0:
            return  # read the request, then reset: it may have run
        while line is not None:
            sock.sendall(reply_for(line))
            line = server.read_line(sock, buf)

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=2) as client, pytest.raises(MaybeExecuted):
            client.call(4, {"tag": "once"})
        assert len(fake.lines) == 1  # never sent twice
        fake.accepted = 0
        with Client(fake.address, timeout=2) as client:
            assert client.call(4, {"tag": "twice"}, idempotent=True) == {"tag": "twice"}
        fake.accepted = 0
        with Client(fake.address, timeout=2, idempotent={4}) as client:
            assert client.call(4, {"tag": "set"}) == {"tag": "set"}
    finally:
        fake.close()


@pytest.mark.slow
def test_black_hole_times_out_then_the_connection_is_presumed_dead(monkeypatch):
    monkeypatch.setattr(clientconn, "STUCK_GRACE", 0.2)

    def behaviour(server, sock, n):
        buf: list[bytes] = []
        while server.read_line(sock, buf) is not None:
            pass  # never answers

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(CallTimeout):
                client.call(1, {})
            assert 0.25 < time.monotonic() - started < 1.3
            gevent.sleep(0.3)  # past deadline + grace: the next checkout drops that connection
            with pytest.raises(CallTimeout):
                client.call(1, {})
        assert fake.accepted == 2
    finally:
        fake.close()


@pytest.mark.slow
@pytest.mark.parametrize("unordered", [True, False], ids=["unordered", "ordered"])
def test_timed_out_callers_reply_is_dropped_not_given_to_the_next_caller(unordered):
    """Anchor case 38 (redis-py CVE-2023-28858 class): 100 ms delay each way, A times out at 150 ms,
    B goes out at once on the same connection and must get B's reply."""
    with serve(client_app.registry) as server:
        proxy = FaultProxy(addr(server), latency=0.1)
        try:
            with Client(proxy.address, timeout=2, pool_size=1, unordered=unordered) as client:
                for round_ in range(3):
                    with pytest.raises(CallTimeout):
                        client.call(1, {"who": "A", "round": round_}, timeout=0.15)
                    assert client.call(1, {"who": "B", "round": round_}) == {"who": "B", "round": round_}
                assert client.describe()["gevent-hub-" + hex(id(gevent.get_hub()))[2:]][0]["connections"] == 1
        finally:
            proxy.close()


@pytest.mark.slow
@pytest.mark.parametrize("unordered", [True, False], ids=["unordered", "ordered"])
def test_cancelled_greenlets_never_leave_replies_for_others(unordered):
    """Kill and gevent.Timeout waiting callers at random moments while others call: nobody ever
    receives another caller's reply."""
    with serve(client_app.registry) as server:
        proxy = FaultProxy(addr(server), latency=0.02)
        try:
            with Client(proxy.address, timeout=5, pool_size=1, unordered=unordered) as client:
                def caller(k):
                    for i in range(15):
                        assert client.call(2, {"seconds": 0.01 * (i % 3), "k": k, "i": i})["k"] == k

                def victim(k):
                    with gevent.Timeout(0.03 + 0.01 * (k % 4), False):
                        client.call(2, {"seconds": 0.05, "k": -k})

                good = [gevent.spawn(caller, k) for k in range(10)]
                for k in range(30):
                    g = gevent.spawn(victim, k)
                    gevent.sleep(0.01)
                    if k % 3 == 0:
                        g.kill(block=False)
                gevent.joinall(good, raise_error=True, timeout=30)
                assert all(g.successful() for g in good)
        finally:
            proxy.close()


@pytest.mark.parametrize("unordered", [True, False], ids=["unordered", "ordered"])
def test_write_interrupted_mid_request_discards_the_connection(unordered):
    """A gevent.Timeout during sendall of an 8 MiB request (through a 4 MiB/s link): the partial line
    is never processed and later requests are not corrupted."""
    with serve(client_app.registry, max_line_bytes=16 << 20) as server:
        proxy = FaultProxy(addr(server), rate=4 << 20, slice=65536)
        try:
            with Client(proxy.address, timeout=5, pool_size=1, unordered=unordered) as client:
                client_app.executed.clear()
                with pytest.raises(gevent.Timeout):
                    with gevent.Timeout(0.1):
                        client.call(4, {"tag": "big", "blob": "x" * (8 << 20)})
                assert client.call(4, {"tag": "small"})["tag"] == "small"
                gevent.sleep(0.3)
                assert client_app.executed == ["small"]
                assert server.stats.protocol_errors == 0
        finally:
            proxy.close()


@pytest.mark.parametrize("unordered", [True, False], ids=["unordered", "ordered"])
def test_one_byte_slices_both_ways(unordered):
    with serve(client_app.registry) as server:
        proxy = FaultProxy(addr(server), slice=1)
        try:
            with Client(proxy.address, timeout=10, pool_size=1, unordered=unordered) as client:
                jobs = [gevent.spawn(client.call, 1, {"i": i, "s": "é✓"}) for i in range(10)]
                gevent.joinall(jobs, raise_error=True)
                assert [j.value for j in jobs] == [{"i": i, "s": "é✓"} for i in range(10)]
        finally:
            proxy.close()


@pytest.mark.slow
def test_deadline_is_honoured_by_the_server():
    """The server stops at the deadline the client sent: a 504 well before the handler's 5 s."""
    with serve(client_app.registry) as server, Client(addr(server), timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            # 1 s: the client keeps 50 ms of it back so that the server's 504 beats its own timer; with
            # 0.3 s (30 ms kept) a loaded host's scheduling jitter let the client's timer fire first.
            client.call(2, {"seconds": 5}, timeout=1.0)
        assert info.value.code == 504
        assert time.monotonic() - started < 2.5  # the server's deadline, well before the handler's 5 s
        assert client.call(1, {"after": True}) == {"after": True}


def test_closed_connection_raises_not_sent():
    with serve(client_app.registry) as server:
        client = Client(addr(server), timeout=2)
        client.call(1, {})
        client.close()
        with pytest.raises(NotSent):
            client.call(1, {})


@pytest.mark.slow
def test_high_latency_link_the_deadline_is_still_honoured():
    """Anchor case 39, latency 500 ms each way: a 0.3 s call gives up at 0.3 s, not at the round trip."""
    with serve(client_app.registry) as server:
        proxy = FaultProxy(addr(server), latency=0.5)
        try:
            with Client(proxy.address, timeout=5) as client:
                started = time.monotonic()
                with pytest.raises(CallTimeout):
                    client.call(1, {"slow": "link"}, timeout=0.3)
                assert 0.28 < time.monotonic() - started < 0.6
                assert client.call(1, {"then": 1}, timeout=3) == {"then": 1}
        finally:
            proxy.close()


def test_too_long_request_gets_its_413_and_others_are_unaffected():
    """The server cannot read the id of a line over its limit and answers 413 without one; replies
    come in order, so it belongs to the oldest unanswered request, which is that one."""
    from geventtcp.errors import RequestTooLarge

    with serve(client_app.registry, max_line_bytes=4096) as server, \
            Client(addr(server), timeout=5, pool_size=1) as client:
        before = [gevent.spawn(client.call, 2, {"seconds": 0.05, "i": i}) for i in range(5)]
        wait_until(lambda: server.inflight >= 5)  # all five written and running before the long line
        big = gevent.spawn(client.call, 1, {"blob": "x" * 10000})
        after = [gevent.spawn(client.call, 1, {"j": j}) for j in range(5)]
        gevent.joinall([*before, big, *after], timeout=10)
        assert isinstance(big.exception, RequestTooLarge) and big.exception.code == 413
        assert [g.value for g in before] == [{"seconds": 0.05, "i": i} for i in range(5)]
        assert [g.value for g in after] == [{"j": j} for j in range(5)]


@pytest.mark.parametrize("line, kind", [
    ({"code": 408, "cmdid": None, "msg": "request line not completed within 10s"}, MaybeExecuted),
    ({"code": 401, "cmdid": None, "msg": "not authenticated within 10s"}, MaybeExecuted),
    ({"code": 413, "cmdid": None, "msg": "request line longer than 4096 bytes"}, MaybeExecuted),
    ({"code": 503, "cmdid": None, "msg": "max number of connections reached"}, Unprocessed),
])
def test_error_line_without_id_fails_the_connection_not_an_innocent_caller(line, kind):
    """An id-less error line is the server speaking for the connection (the client always sends
    ids): both waiting callers get a transport error naming the server's code, never that line as
    their own RemoteError, and the connection is replaced."""

    def behaviour(server, sock, n):
        buf: list[bytes] = []
        if n == 0:
            for _ in range(2):
                server.read_line(sock, buf)
            sock.sendall(json.dumps(line).encode() + b"\n")
            gevent.sleep(30)  # a real server closes after such a line; the client must not need that
        else:
            while (request := server.read_line(sock, buf)) is not None:
                sock.sendall(reply_for(request))

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=5, retries=0, pool_size=1) as client:
            jobs = [gevent.spawn(client.call, 1, {"i": i}) for i in range(2)]
            gevent.joinall(jobs, timeout=10)
            for job in jobs:
                assert type(job.exception) is kind, job.exception
                assert f"[{line['code']}]" in str(job.exception)
            assert client.call(1, {"after": True}) == {"after": True}
        assert fake.accepted == 2
    finally:
        fake.close()


def test_503_refusal_at_connect_is_unprocessed_and_retried_elsewhere():
    """A real server at max_connections answers a new connection with an id-less 503 and closes it:
    the call on it is Unprocessed (nothing ran), so with two addresses it is retried on the other."""
    with serve(client_app.registry, max_connections=1) as full, serve(client_app.registry) as spare:
        hog = gsocket.create_connection(full.address[:2])
        try:
            wait_until(lambda: len(full.connections) == 1)
            with Client(addr(full), timeout=5, retries=0) as client:
                with pytest.raises(Unprocessed, match="max number of connections"):
                    client.call(1, {"x": 1})
            with Client([addr(full), addr(spare)], timeout=5, retries=2) as client:
                assert [client.call(1, {"i": i}) for i in range(6)] == [{"i": i} for i in range(6)]
        finally:
            hog.close()


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_both_connection_kinds_keep_back_the_same_deadline_margin(monkeypatch, mode):
    """The batching (gevent) and plain (threads) connections build request lines with one helper:
    both send ``timeout_ms`` = remaining time less clientcall.DEADLINE_MARGIN (here raised to 0.5 s)."""
    from geventtcp.client import call as clientcall
    from geventtcp.client.batch import BatchingConnection

    monkeypatch.setattr(clientcall, "DEADLINE_MARGIN", 0.5)

    def behaviour(server, sock, n):
        buf: list[bytes] = []
        while (line := server.read_line(sock, buf)) is not None:
            sock.sendall(reply_for(line))

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=10, mode=mode) as client:
            if mode == "threads":
                assert gevent.get_hub().threadpool.spawn(client.call, 1, {"t": 1}).get(timeout=10) == {"t": 1}
            else:
                assert client.call(1, {"g": 1}) == {"g": 1}
            conn = next(iter(client._balancers.values())).pools[0].conns[0]
            assert isinstance(conn, BatchingConnection) is (mode == "gevent")
        assert 9400 <= json.loads(fake.lines[-1])["timeout_ms"] <= 9500
    finally:
        fake.close()


# -- the lone caller's short path (threads world): lock-free stores that must never lose a caller --

def _wait_reading_written(conn):
    """Until a caller holds the reader role and a request is out whole (not merely registered)."""
    wait_until(lambda: conn.reading and any(call.written for call in list(conn.calls.values())), timeout=5)


def _threads_conn(client):
    conns = client._balancers["threads"].pools[0].conns
    return conns[0] if conns else None



@pytest.mark.slow
@pytest.mark.subprocess
def test_caller_arriving_behind_a_lone_reader_is_handed_the_role(app_process):
    """A lone caller reads its slow reply; a second caller arrives meanwhile on the same connection
    and waits for a reply that comes later. When the first finishes it must hand the reader role to
    the second (or the second would sit out its whole timeout): every round, the second returns in time."""
    with Client(app_process.address, timeout=5, pool_size=1, mode="threads") as client:
        client.call(client_app.ECHO, {})
        for round_ in range(6):
            first, out1 = in_thread(client.call, client_app.SLEEP, {"seconds": 0.1, "r": round_})
            conn = _threads_conn(client)
            _wait_reading_written(conn)
            gevent.sleep(0.002 * round_)
            # Its reply comes well after the first's (the server runs both at once, answers in order).
            second, out2 = in_thread(client.call, client_app.SLEEP, {"seconds": 0.2, "second": round_})
            first.join(10)
            second.join(10)
            assert out1.get("value") == {"seconds": 0.1, "r": round_}, out1
            assert out2.get("value") == {"seconds": 0.2, "second": round_}, out2
            assert out2["elapsed"] < 1.5, out2  # never waited out its 5 s timeout
        assert len(client._balancers["threads"].pools[0].conns) == 1
        assert not _threads_conn(client).calls and not _threads_conn(client).reading


@pytest.mark.slow
@pytest.mark.subprocess
def test_lone_call_when_the_client_is_closed_meanwhile_fails_fast_and_closes_the_socket(app_process):
    with Client(app_process.address, timeout=5, pool_size=1, mode="threads") as client:
        client.call(client_app.ECHO, {})
        conn = _threads_conn(client)
        t, out = in_thread(client.call, client_app.RECORD, {"tag": "closed-meanwhile", "seconds": 1})
        _wait_reading_written(conn)
        client.close()
        t.join(10)
        assert isinstance(out.get("error"), MaybeExecuted), out
        assert out["elapsed"] < 0.9
        wait_until(lambda: conn.sock_closed, timeout=5)
        with pytest.raises(NotSent):
            client.call(client_app.ECHO, {})


@pytest.mark.subprocess
def test_lone_call_timeout_then_the_next_lone_call_gets_its_own_reply(app_process):
    with Client(app_process.address, timeout=5, pool_size=1, mode="threads", retries=0) as client:
        for round_ in range(3):
            with pytest.raises((CallTimeout, DeadlineExceeded)):  # the server's 504 or our own timeout
                client.call(client_app.SLEEP, {"seconds": 0.2, "r": round_}, timeout=0.05)
            assert client.call(client_app.ECHO, {"after": round_}) == {"after": round_}
        assert len(client._balancers["threads"].pools[0].conns) == 1


@pytest.mark.subprocess
def test_server_killed_during_a_lone_call_is_maybe_executed():
    proc = ServerProcess()
    try:
        with Client(proc.address, timeout=5, pool_size=1, mode="threads") as client:
            client.call(client_app.ECHO, {})
            conn = _threads_conn(client)
            t, out = in_thread(client.call, client_app.RECORD, {"tag": "killed", "seconds": 2})
            _wait_reading_written(conn)
            proc.kill()
            t.join(10)
            assert isinstance(out.get("error"), MaybeExecuted), out
            assert out["elapsed"] < 1.9
            assert conn.closed and not conn.reading
            wait_until(lambda: conn.sock_closed, timeout=5)
    finally:
        proc.close()
