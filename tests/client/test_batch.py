"""Gevent-world write coalescing: one send for many greenlets' requests, and its failure paths."""

import json

import gevent
import gevent.event
import pytest

from geventtcp.client.batch import FLUSH_LINES, BatchingConnection
from geventtcp.client.client import Client
from geventtcp.errors import NotSent
from tests.support.faults import FakeServer
from tests.support.system import wait_until


def echo_counting_reads(server, sock, n):
    buf = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        server.reads.append(chunk.count(b"\n"))
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out = b""
        for line in lines:
            req = json.loads(line)
            reply = {"code": 0, "cmdid": req["cmdid"], "id": req["id"], "data": req["params"]}
            out += json.dumps(reply).encode() + b"\n"
        sock.sendall(out)


def test_requests_of_many_greenlets_leave_in_one_send():
    fake = FakeServer(echo_counting_reads)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            client.call(1, {"warm": 1})
            jobs = [gevent.spawn(client.call, 1, {"i": i}) for i in range(50)]
            gevent.joinall(jobs, raise_error=True)
            assert [j.value for j in jobs] == [{"i": i} for i in range(50)]
            conn = next(iter(client._balancers.values())).pools[0].conns[0]
            assert isinstance(conn, BatchingConnection)
        # The HELLO (protocol 1.1) leaves in the same send as the first call: no round trip of its own.
        assert fake.reads[0] == 2 and sum(fake.reads) == 52
        assert len(fake.reads) <= 5  # 50 requests arrived in very few reads (parts of FLUSH_LINES), not 50
    finally:
        fake.close()


def test_a_big_batch_leaves_in_parts_of_flush_lines_within_the_turn():
    """40 greenlets queue in one loop turn: every FLUSH_LINES lines go out at once (the server starts
    on them while the rest queue), the remainder at the end of the turn; replies still match."""
    fake = FakeServer(echo_counting_reads)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            client.call(1, {"warm": 1})
            conn = next(iter(client._balancers.values())).pools[0].conns[0]
            assert isinstance(conn, BatchingConnection)
            sends = []
            raw_send = conn._raw_send

            def counting_send(data):
                sends.append(bytes(data).count(b"\n"))
                return raw_send(data)

            conn._raw_send = counting_send
            jobs = [gevent.spawn(client.call, 1, {"i": i}) for i in range(2 * FLUSH_LINES + 8)]
            gevent.joinall(jobs, raise_error=True)
            assert [j.value for j in jobs] == [{"i": i} for i in range(2 * FLUSH_LINES + 8)]
        assert sends == [FLUSH_LINES, FLUSH_LINES, 8]
    finally:
        fake.close()


def test_send_returns_only_once_the_line_is_written():
    fake = FakeServer(echo_counting_reads)
    try:
        with Client(fake.address, timeout=5) as client:
            client.send(1, {"fire": 1})
            conn = next(iter(client._balancers.values())).pools[0].conns[0]
            assert isinstance(conn, BatchingConnection)
            assert not conn.out and conn.sender is None  # nothing left queued behind send()
            wait_until(lambda: sum(fake.reads) == 2)  # the HELLO and the line sent
    finally:
        fake.close()


def _sending_conn(client):
    """The client's one connection, once a sender greenlet is finishing a send the kernel cut short."""
    def conn():
        for balancer in list(client._balancers.values()):
            for c in balancer.pools[0].conns:
                if c.sender is not None:
                    return c
        return None

    wait_until(lambda: conn() is not None)
    return conn()


def test_queued_requests_behind_a_stuck_send_fail_as_not_sent():
    """The server stops reading: a 16 MiB request fills the socket, small ones queue behind it; when
    the connection is closed, none of them was written whole, so each raises NotSent (safe to resend)."""

    def never_read(server, sock, n):
        gevent.sleep(30)

    fake = FakeServer(never_read)
    try:
        with Client(fake.address, timeout=10, retries=0, pool_size=1) as client:
            big = gevent.spawn(client.call, 1, {"blob": "x" * (16 << 20)})
            conn = _sending_conn(client)  # the kernel took part of it; a greenlet sends the rest
            small = [gevent.spawn(client.call, 1, {"i": i}) for i in range(5)]
            wait_until(lambda: len(conn.out) == 5)  # queued behind the unfinished send
            conn.close("test")
            gevent.joinall([big, *small], timeout=5)
            for job in [big, *small]:
                assert isinstance(job.exception, NotSent), job.exception
    finally:
        fake.close()


def test_cancelling_a_request_still_queued_just_removes_it():
    def never_read(server, sock, n):
        gevent.sleep(30)

    fake = FakeServer(never_read)
    try:
        with Client(fake.address, timeout=10, retries=0, pool_size=1) as client:
            big = gevent.spawn(client.call, 1, {"blob": "x" * (16 << 20)})
            conn = _sending_conn(client)
            victim = gevent.spawn(client.call, 1, {"victim": True})
            wait_until(lambda: len(conn.out) == 1)
            victim.kill()
            assert conn.out == [] and not conn.closed  # removed from the queue; the stream is intact
            big.kill()  # cancelled mid-write: the stream is broken, so the connection goes
            assert conn.closed
    finally:
        fake.close()


@pytest.mark.parametrize("n", [1, 200])
def test_batching_connection_matches_replies(n):
    fake = FakeServer(echo_counting_reads)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            jobs = [gevent.spawn(client.call, 7, {"k": k}) for k in range(n)]
            gevent.joinall(jobs, raise_error=True)
            assert [j.value for j in jobs] == [{"k": k} for k in range(n)]
    finally:
        fake.close()


@pytest.mark.xfail(strict=True, reason=(
    "a trade-off, not fixed: the connection is closed so that the cancelled, partly sent line never "
    "runs (test_connection.py::test_write_interrupted_mid_request_discards_the_connection); abandoning "
    "it instead lets the sender finish the line, which then runs. Ending the partial line early with "
    "a newline (the server refuses the truncated JSON with an id-less 400 and keeps the connection) "
    "would give both, but the sender sends lines joined, so the rest of the batch must be spliced"))
@pytest.mark.parametrize("cancel", ["kill", "gevent.Timeout"])
def test_cancelling_a_request_whose_line_is_being_sent_does_not_fail_the_calls_in_flight(cancel):
    """Review (rv-client): the class docstring says a caller giving up once its line's sending started
    abandons it; the code closes the connection (``_abandon``): a greenlet cancelled (``kill``, its
    own ``gevent.Timeout``) while a sender greenlet is still writing its big line fails another
    greenlet's call, written whole and waiting for its reply, with MaybeExecuted (truthful, but one
    caller's cancel costs another its call)."""
    release = gevent.event.Event()

    def answer_first_then_stop_reading(server, sock, n):
        buf: list[bytes] = []
        line = server.read_line(sock, buf)
        req = json.loads(line)
        release.wait(10)  # meanwhile a 16 MiB request fills the socket: nothing more is read
        sock.sendall(b'{"code":0,"cmdid":1,"id":%d,"data":{"first":1}}\n' % req["id"])
        gevent.sleep(10)

    fake = FakeServer(answer_first_then_stop_reading)
    try:
        with Client(fake.address, timeout=10, retries=0, pool_size=1) as client:
            first = gevent.spawn(client.call, 1, {"first": 1})
            wait_until(lambda: len(fake.lines) == 1)  # written whole, its reply held back

            def big_call():
                if cancel == "kill":
                    return client.call(1, {"blob": "x" * (16 << 20)})
                with gevent.Timeout(0.3):
                    return client.call(1, {"blob": "x" * (16 << 20)})

            big = gevent.spawn(big_call)
            conn = _sending_conn(client)  # the kernel took part of it; a greenlet sends the rest
            if cancel == "kill":
                big.kill()
            else:
                big.join(5)
                assert isinstance(big.exception, gevent.Timeout)
            release.set()
            assert first.get(timeout=5) == {"first": 1}
            assert not conn.closed, conn.reason
    finally:
        fake.close()
