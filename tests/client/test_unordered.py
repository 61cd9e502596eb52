"""The client and protocol 1.1 (issue 14): HELLO on each new connection, completion order when the
server grants it, request order with a server that does not know HELLO, and least-in-flight spreading."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from geventtcp import Server
from geventtcp.client import pool as pool_module
from geventtcp.client.client import Client
from geventtcp.client.connection import STUCK_GRACE, ClientConnection
from geventtcp.client.pool import MAX_REPLACEMENTS
from geventtcp.errors import NotSent
from geventtcp.protocol import Builtin
from tests.support.apps import make_registry
from tests.support.faults import FakeServer
from tests.support.servers import CliServer, addr, serve
from tests.support.system import python_cmd, wait_until


def _conns(client: Client) -> list[ClientConnection]:
    return [conn for balancer in client._balancers.values() for pool in balancer.pools for conn in pool.conns]


def _old_server(server: Server) -> Server:
    """Make ``server`` a server before 1.1: HELLO unknown (answered as any unknown cmdid)."""
    del server.state.calls[Builtin.HELLO]
    del server.state.preauth_calls[Builtin.HELLO]
    return server


@pytest.fixture
def server() -> Iterator[Server]:
    with serve(make_registry()) as srv:
        yield srv


def _slow_then_fast(client: Client) -> tuple[float, bool]:
    """A 0.5 s call, then a fast one on the same connection: when the fast one returned, and whether
    the slow one was still running then."""
    slow = gevent.spawn(client.call, 2, {"seconds": 0.5})
    gevent.sleep(0.05)  # the slow request is written and running
    started = time.monotonic()
    assert client.call(1, {"fast": 1}) == {"fast": 1}
    took = time.monotonic() - started
    running = not slow.ready()
    assert slow.get(timeout=5) == {"slept": 0.5}
    return took, running


def test_a_fast_call_overtakes_a_slow_one_on_the_same_connection(server: Server) -> None:
    with Client(addr(server), timeout=5, pool_size=1) as client:
        assert client.call(1, {"warm": 1}) == {"warm": 1}
        (conn,) = _conns(client)
        assert conn.unordered and conn.hello_id is None
        took, running = _slow_then_fast(client)
        assert running and took < 0.3, took
        assert len(_conns(client)) == 1  # one connection carried both


def test_a_server_without_hello_keeps_request_order(server: Server) -> None:
    """A 1.0 server answers the HELLO 404: the client falls back to request order (the fast call
    waits behind the slow one on the one connection) and every call is answered."""
    _old_server(server)
    with Client(addr(server), timeout=5, pool_size=1) as client:
        assert client.call(1, {"warm": 1}) == {"warm": 1}
        (conn,) = _conns(client)
        assert not conn.unordered and conn.hello_id is None
        took, running = _slow_then_fast(client)
        assert not running and took > 0.3, took
    assert server.stats.unknown_commands == 1  # the one HELLO


def test_a_server_without_hello_and_with_auth_keeps_request_order() -> None:
    """Before AUTH a 1.0 server answers the unknown HELLO 401: still only a fallback, AUTH succeeds."""
    with serve(make_registry(), auth_token="s3cret") as server:
        _old_server(server)
        with Client(addr(server), timeout=5, pool_size=1, auth_token="s3cret") as client:
            assert client.call(1, {"a": 1}) == {"a": 1}
            (conn,) = _conns(client)
            assert not conn.unordered


def test_hello_is_sent_before_auth_and_granted() -> None:
    with serve(make_registry(), auth_token="s3cret") as server:
        with Client(addr(server), timeout=5, pool_size=1, auth_token="s3cret") as client:
            assert client.call(1, {"a": 1}) == {"a": 1}
            (conn,) = _conns(client)
            assert conn.unordered


def test_against_a_fake_1_0_server_one_hello_per_connection_and_none_when_disabled() -> None:
    def echo(fake: FakeServer, sock: Any, n: int) -> None:
        import json

        buf: list[bytes] = []
        while (line := fake.read_line(sock, buf)) is not None:
            req = json.loads(line)
            sock.sendall(json.dumps({"code": 0, "cmdid": req["cmdid"], "id": req["id"],
                                     "data": req["params"]}).encode() + b"\n")

    fake = FakeServer(echo)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            for i in range(3):
                assert client.call(1, {"i": i}) == {"i": i}
            assert not _conns(client)[0].unordered
        assert (fake.accepted, fake.hellos, len(fake.lines)) == (1, 1, 3)
        with Client(fake.address, timeout=5, pool_size=1, unordered=False) as client:
            assert client.call(1, {"i": 9}) == {"i": 9}
        assert (fake.accepted, fake.hellos, len(fake.lines)) == (2, 1, 4)
    finally:
        fake.close()


def test_against_one_process_greenlets_share_one_connection(server: Server) -> None:
    """One worker (HELLO says ``workers: 1``): 40 overlapping greenlets batch on one connection."""
    with Client(addr(server), timeout=5, pool_size=4) as client:
        client.call(1, {})  # connected (a burst before any connection is open opens up to pool_size)
        jobs = [gevent.spawn(client.call, 2, {"seconds": 0.1, "i": i}) for i in range(40)]
        gevent.joinall(jobs, raise_error=True, timeout=10)
        assert [job.value["slept"] for job in jobs] == [0.1] * 40
        (conn,) = _conns(client)
        assert (conn.server_pid, conn.server_workers) == (os.getpid(), 1)


def test_connections_sharing_one_worker_are_replaced_a_bounded_number_of_times() -> None:
    """A server whose HELLO says 2 workers but that is one process: every new connection lands on
    the same pid; the pool retires and reopens at most MAX_REPLACEMENTS times, and no call fails."""
    with serve(make_registry(), workers=2) as server, Client(addr(server), timeout=5, pool_size=4) as client:
        client.call(1, {})
        for _ in range(30):
            jobs = [gevent.spawn(client.call, 2, {"seconds": 0.01}) for _ in range(20)]
            gevent.joinall(jobs, raise_error=True, timeout=10)
        (pool,) = client._balancers[next(iter(client._balancers))].pools
        assert pool.replaced == MAX_REPLACEMENTS
        assert {conn.server_workers for conn in pool.conns} == {2}
        assert server.stats.as_dict()["connections_total"] == 2 + MAX_REPLACEMENTS


def test_the_replacement_budget_renews_after_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget of MAX_REPLACEMENTS is per REPLACEMENT_WINDOW, not per pool life: a pool whose
    connections all landed on one worker while the other was busy (or while a reload's new workers
    came up one after the other) used to stay there for good once the budget was spent; it tries
    again in the next window, and never more than the budget per window."""
    monkeypatch.setattr(pool_module, "REPLACEMENT_WINDOW", 0.3)
    with serve(make_registry(), workers=2) as server, Client(addr(server), timeout=5, pool_size=4) as client:
        client.call(1, {})
        started = time.monotonic()
        rounds = 0
        while time.monotonic() - started < 1.0 or rounds < 30:
            jobs = [gevent.spawn(client.call, 2, {"seconds": 0.01}) for _ in range(20)]
            gevent.joinall(jobs, raise_error=True, timeout=10)
            rounds += 1
        elapsed = time.monotonic() - started
        opened = server.stats.as_dict()["connections_total"] - 2  # beyond the first two
        assert opened > MAX_REPLACEMENTS  # a second window's budget was used: before, exactly MAX_REPLACEMENTS
        assert opened <= MAX_REPLACEMENTS * (elapsed / 0.3 + 1)


@pytest.mark.subprocess
@pytest.mark.slow
def test_one_gevent_clients_load_reaches_both_workers_behind_one_listener() -> None:
    """Issue 14: ``serve --workers 2`` and 100 greenlets on one Client: each worker serves 35-65 %."""
    server = CliServer(python_cmd("-m", "geventtcp", "serve", "handlers", "--bind", "127.0.0.1:0", "--workers", "2",
                                  "--log-level", "info"))
    try:
        address = f"{server.host}:{server.port}"

        def served() -> list[int]:  # STATS merges the other worker's snapshot of up to ~1 s ago
            with Client(address, pool_size=1, unordered=False) as probe:
                return [w["requests"] for w in probe.stats()["workers"]]

        wait_until(lambda: len(served()) == 2, timeout=20)
        with Client(address, timeout=10) as client:
            def caller(k: int) -> None:
                for i in range(30):
                    assert client.call(1, {"k": k, "i": i}) == {"k": k, "i": i}

            client.call(1, {})
            gevent.joinall([gevent.spawn(caller, k) for k in range(100)], raise_error=True, timeout=60)
            pids = {conn.server_pid for conn in _conns(client)}
        wait_until(lambda: sum(served()) >= 3000, timeout=10)
        served_now = served()
        assert len(pids) == 2 and all(0.35 <= n / sum(served_now) <= 0.65 for n in served_now), served_now
    finally:
        server.proc.terminate()
        server.rest_of_output()


def test_a_lone_caller_keeps_one_connection(server: Server) -> None:
    with Client(addr(server), timeout=5, pool_size=4) as client:
        for i in range(20):
            assert client.call(1, {"i": i}) == {"i": i}
        assert len(_conns(client)) == 1


def _ignores_hello(fake: FakeServer, sock: Any, n: int) -> None:
    """A server that never answers HELLO (drops the line) and answers everything else by id; cmdid 2
    answers after ``params.seconds``, from its own greenlet."""
    import json

    def reply(req: dict[str, Any], delay: float) -> None:
        gevent.sleep(delay)
        sock.sendall(json.dumps({"code": 0, "cmdid": req["cmdid"], "id": req["id"], "data": req["params"]}).encode()
                     + b"\n")

    buf: list[bytes] = []
    while (line := fake.read_line(sock, buf)) is not None:
        req = json.loads(line)
        if req["cmdid"] == Builtin.HELLO:
            continue
        if req["cmdid"] == 2:
            gevent.spawn(reply, req, req["params"]["seconds"])
        else:
            reply(req, 0)


def test_a_server_that_never_answers_hello_does_not_fail_calls_in_flight() -> None:
    """Review round 3: the unanswered HELLO stayed the connection's oldest request, so once its deadline
    (the first call's) was STUCK_GRACE past, the next checkout declared the connection dead and failed
    a healthy call in flight with MaybeExecuted (and every connection lived only that long). Replies to
    later requests prove the server is alive and skipped the HELLO: the client drops it instead."""
    fake = FakeServer(_ignores_hello, answer_hello=False)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            assert client.call(1, {"first": 1}, timeout=0.2) == {"first": 1}  # the HELLO's deadline
            slow = gevent.spawn(client.call, 2, {"seconds": 2.0})
            gevent.sleep(0.2 + STUCK_GRACE + 0.2)  # the HELLO is long overdue now
            assert client.call(1, {"next": 1}) == {"next": 1}  # a checkout meanwhile
            assert slow.get(timeout=5) == {"seconds": 2.0}
            (conn,) = _conns(client)
            assert not conn.unordered and conn.hello_id is None and not conn.calls
        assert fake.accepted == 1
    finally:
        fake.close()


@pytest.mark.parametrize("how", ["call", "send"])
def test_a_connection_retired_between_checkout_and_send_is_not_a_failed_attempt(
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Review round 3: a caller's ``acquire`` returns a connection; before it registers its request
    (threads: another thread runs meanwhile), another caller's checkout retires that connection
    (to spread over workers) and, as it has no call in flight, closes it. The request then failed with
    NotSent "retired to spread over workers" (seen with 8 threads against ``--workers 2``: a failed
    call with ``retries=0``, otherwise a retry with backoff). The retired connection's NotSent is now
    sent again at once, without using an attempt."""
    from geventtcp.client.pool import Pool

    with serve(make_registry(), workers=2) as server, \
            Client(addr(server), timeout=5, pool_size=2, retries=0) as client:
        client.call(1, {})
        real = Pool.acquire
        raced: list[ClientConnection] = []

        def acquire(pool: Pool, deadline: float, now: float | None = None) -> ClientConnection:
            conn = real(pool, deadline, now)
            if not raced:  # the other thread's checkouts, between this one and the request
                raced.append(conn)
                conn.retiring = True  # as _spread_over_workers marks the least busy of a crowded worker
                with pool.lock:
                    pool._checkout_spread(time.monotonic())  # which closes a retiring connection once idle
            return conn

        monkeypatch.setattr(Pool, "acquire", acquire)
        if how == "call":
            assert client.call(1, {"after": 1}) == {"after": 1}
        else:
            client.send(1, {"after": 1})
        assert raced and raced[0].closed and raced[0].reason == "retired to spread over workers"


@pytest.mark.parametrize("how", ["call", "send"])
def test_a_request_past_its_deadline_on_a_lone_retiring_connection_fails_instead_of_spinning(
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Review (rv-client): a pool's only connection can be a retiring one (it was retired with calls in
    flight, then the pool's other connection closed; the lone-connection checkout never closes it). A
    request on it whose deadline passes before its line is numbered raises NotSent without closing the
    connection; that NotSent was taken for "retired under us" and the call checked out again at once,
    got the same open connection, and so on: the call never returned (a busy loop past its deadline).
    It now fails with the NotSent (nothing was sent)."""
    from geventtcp.client.pool import Pool

    with serve(make_registry(), workers=2) as server, Client(addr(server), timeout=5, retries=0) as client:
        client.call(1, {})
        (conn,) = _conns(client)
        conn.retiring = True  # as _spread_over_workers left it, its pool's other connection gone since
        real = Pool.acquire
        checkouts: list[ClientConnection] = []

        def acquire(pool: Pool, deadline: float, now: float | None = None) -> ClientConnection:
            got = real(pool, deadline, now)
            checkouts.append(got)
            assert len(checkouts) < 50, "the call keeps checking out the same connection past its deadline"
            return got

        monkeypatch.setattr(Pool, "acquire", acquire)
        # A deadline that passes between the checkout and the request line (a loaded machine, a tiny timeout).
        with pytest.raises(NotSent):
            if how == "call":
                client.call(1, {"late": 1}, timeout=1e-9)
            else:
                client.send(1, {"late": 1}, timeout=1e-9)
        assert checkouts == [conn]
        assert not conn.closed and conn.calls == {}
