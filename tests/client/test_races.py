"""The client under races: threads and greenlets at once on shared connections, cancellation, close, kill.

The F1-F4 tests reproduce races found in review (each failed before its fix):


F1  threads world: ``_release_reader`` clears ``reading`` without the lock, then again under it, so a
    caller that took the free role in between loses it and a second reader starts (two threads in
    ``recv`` on one socket: ``RuntimeError: concurrent poll() invocation`` reaches callers, or a
    thread blocks in ``recv`` past its deadline, or the line buffer is fed from two threads).
F2  gevent world: a waiting greenlet handed the reader role and cancelled (gevent.Timeout, kill)
    before it woke drops the role: the other waiters sit out their whole timeout although their
    replies have come (pre-existing, also on 9c1bc88).
F3  threads world: ``ClientConnection.usable()``/``stalled()`` iterate ``calls`` without the lock
    while other threads add and remove calls: ``RuntimeError: dictionary changed size during
    iteration`` escapes ``Client.call`` (pre-existing, rare; probabilistic test).
F4  the default (simplejson) client decodes ``1e999`` in a reply as ``inf`` instead of refusing the
    line (the strict codec and the orjson path refuse it; pre-existing).
"""

import json
import threading
import time
from typing import Any

import gevent
import pytest

from geventtcp.client.call import Call, request_line
from geventtcp.client.client import Client
from geventtcp.client.concurrency import THREADS
from geventtcp.client.replycodec import ReplyCodec
from geventtcp.codec import get_codec
from geventtcp.errors import MaybeExecuted, NotSent, ProtocolError
from geventtcp.protocol import encode_request
from tests.support import client_app
from tests.support.faults import FakeServer
from tests.support.servers import ServerProcess
from tests.support.system import in_thread, run_python, wait_until

# -- F1 ------------------------------------------------------------------------------------------

class _RacingLock:
    """The connection's ``state`` lock, with another thread's critical section run just before the
    next acquisition: exactly what happens when the releasing thread blocks on a contended lock."""

    def __init__(self, lock, before):
        self.lock, self.before = lock, before

    def __enter__(self):
        before, self.before = self.before, None
        if before is not None:
            before()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


@pytest.mark.slow
@pytest.mark.subprocess
def test_f1_release_never_takes_back_a_role_another_caller_took_meanwhile(app_process):
    with Client(app_process.address, timeout=5, pool_size=1, mode="threads") as client:
        client.call(client_app.ECHO, {})
        (conn,) = client._balancers["threads"].pools[0].conns
        waiting = Call(10**6, time.monotonic() + 5, False)  # another caller, waiting for its reply
        waiting.written, waiting.signal = True, THREADS.signal()
        conn.calls[waiting.id] = waiting
        taken = []

        def other_caller_takes_the_free_role():  # what _wait/_write do under ``state``
            if not conn.reading:
                conn.reading = True
                taken.append(1)

        conn.reading = True  # this thread is the reader and is done
        conn.state = _RacingLock(conn.state, other_caller_takes_the_free_role)
        conn._release_reader()
        assert taken
        assert conn.reading, "the role the other caller took was cleared: a third caller may now read too"
        assert not waiting.signaled, "a waiter was woken to read while another caller reads"


F1_STRESS = r"""
import sys, threading, time, collections
sys.setswitchinterval(1e-5)  # preempt often: the race windows are a few bytecodes wide
from geventtcp.client.client import Client
client = Client(ADDRESS, timeout=5, pool_size=1, mode="threads", retries=0)
client.call(1, {})
errors = collections.Counter()
stop = time.monotonic() + 4
def worker(k):
    i = 0
    while time.monotonic() < stop:
        i += 1
        try:
            assert client.call(1, {"k": k, "i": i}) == {"k": k, "i": i}
        except Exception as exc:
            errors[repr(exc)[:90]] += 1
ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
for t in ts: t.start()
for t in ts: t.join(30)
print(dict(errors.most_common(5)))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_f1_eight_threads_on_one_connection_never_see_errors(app_process):
    result = run_python(F1_STRESS.replace("ADDRESS", repr(app_process.address)), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{}"


# -- F2 ------------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_f2_a_cancelled_waiter_that_was_handed_the_reader_role_passes_it_on(app_process):
    """G1 reads; G2 and G3 wait. G1's reply (the server's 504 at its deadline) and G2's gevent.Timeout
    land in one loop turn: G1 hands the role to G2, whose Timeout then fires before it wakes. G3's
    reply comes at ~0.5 s; it must get it then, not sit out its 3 s timeout."""
    with Client(app_process.address, timeout=5, pool_size=1, mode="gevent", retries=0) as client:
        client.call(client_app.ECHO, {})
        out: dict[str, Any] = {}

        def g1():
            try:
                client.call(client_app.SLEEP, {"seconds": 1.0}, timeout=0.3)
            except Exception as exc:
                out["g1"] = type(exc).__name__

        def g2():
            try:
                with gevent.Timeout(0.32):
                    client.call(client_app.SLEEP, {"seconds": 0.5}, timeout=5)
            except gevent.Timeout:
                out["g2"] = "Timeout"

        def g3():
            started = time.monotonic()
            try:
                out["g3"] = client.call(client_app.ECHO, {"x": 3}, timeout=3)
            except Exception as exc:
                out["g3"] = type(exc).__name__
            out["g3_elapsed"] = time.monotonic() - started

        jobs = [gevent.spawn(g1)]
        gevent.sleep(0.01)
        jobs.append(gevent.spawn(g2))
        gevent.sleep(0.01)
        jobs.append(gevent.spawn(g3))
        gevent.sleep(0.2)
        time.sleep(0.2)  # the hub is busy while both deadlines pass: they are handled in one loop turn
        gevent.joinall(jobs, timeout=10)
        assert out.get("g2") == "Timeout", out
        assert out.get("g3") == {"x": 3}, out
        assert out["g3_elapsed"] < 1.5, out


# -- F3 ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.subprocess
def test_f3_checkout_checks_never_race_with_calls_being_added(app_process):
    """usable()/stalled() read ``calls`` while writers and readers (other threads) change it under
    ``state``: the check must never raise."""
    import sys

    with Client(app_process.address, timeout=5, pool_size=1, mode="threads") as client:
        client.call(client_app.ECHO, {})
        (conn,) = client._balancers["threads"].pools[0].conns
        stop = time.monotonic() + 3
        raised: list[BaseException] = []

        def writer():  # what _write and _on_line do, as fast as possible
            n = 10**6
            while time.monotonic() < stop:
                n += 1
                call = Call(n, time.monotonic() + 60, False)
                with conn.state:
                    conn.calls[n] = call
                with conn.state:
                    conn.calls.pop(n, None)

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        t = threading.Thread(target=writer)
        t.start()
        try:
            while time.monotonic() < stop and not raised:
                try:
                    now = time.monotonic()
                    conn.usable(now, 1.0)
                    conn.stalled(now + 1)
                except RuntimeError as exc:
                    raised.append(exc)
        finally:
            t.join(10)
            sys.setswitchinterval(old)
        assert not raised, raised[0]


# -- F4 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("number", [b"1e999", b"-1e400"])
def test_f4_out_of_range_number_in_a_reply_is_refused(number):
    line = b'{"code":0,"id":1,"data":' + number + b"}"
    with pytest.raises(ProtocolError):
        ReplyCodec(get_codec("simplejson")).reply(line)


def test_f4_the_client_never_returns_infinity():
    def behaviour(server, sock, n):
        import json

        buf: list[bytes] = []
        while (line := server.read_line(sock, buf)) is not None:
            rid = json.loads(line)["id"]
            sock.sendall(b'{"code":0,"cmdid":1,"id":%d,"data":1e999}\n' % rid)

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=2, retries=0) as client, pytest.raises(MaybeExecuted):
            value = client.call(1, {})
            pytest.fail(f"got {value!r}")
    finally:
        fake.close()


# -- fast paths under races (passed before review 4; kept as guards) ---------------------------



@pytest.mark.slow
def test_request_line_heads_across_second_turns_from_threads():
    """Four threads encode lines across a wall-clock second turn: each line carries a timestamp of the
    second it was encoded in, and is byte for byte encode_request's line for its fields."""
    codec = get_codec("simplejson")
    lines: list[tuple[float, float, bytes, int, int]] = []
    lock = threading.Lock()
    turn = int(time.time()) + 1
    stop = turn + 0.1

    def encode(k):
        rid = 0
        while time.time() < stop:
            rid += 1
            before = time.time()
            call = Call(0, time.monotonic() + 5, False)
            line = request_line(codec, k, {"k": k, "r": rid}, call, rid, time.monotonic(), "x")
            after = time.time()
            with lock:
                lines.append((before, after, line, k, rid))

    threads = [threading.Thread(target=encode, args=(k,)) for k in (1, 2, 3, -1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert any(int(before) == turn for before, *_ in lines) and any(int(b) == turn - 1 for b, *_ in lines)
    for before, after, line, cmdid, rid in lines:
        req = json.loads(line)
        assert int(before) <= req["timestamp"] <= int(after), (before, after, line)
        assert (req["cmdid"], req["id"], req["params"]) == (cmdid, rid, {"k": cmdid, "r": rid})
        assert 4000 <= req["timeout_ms"] <= 5000
        assert line == encode_request(codec, cmdid, req["params"], rid, req["timeout_ms"], req["timestamp"])


def _echo(server, sock, n):
    buf: list[bytes] = []
    while (line := server.read_line(sock, buf)) is not None:
        req = json.loads(line)
        sock.sendall(json.dumps({"code": 0, "cmdid": req["cmdid"], "id": req["id"], "data": req["params"]}).encode()
                     + b"\n")


def test_under_low_load_a_queued_line_leaves_in_its_own_turn():
    """A lone greenlet, and a burst of three (below FLUSH_LINES), are never held for more lines."""
    fake = FakeServer(_echo)
    try:
        with Client(fake.address, timeout=5, pool_size=1) as client:
            client.call(1, {"warm": 1})
            for i in range(30):
                started = time.monotonic()
                assert client.call(1, {"i": i}) == {"i": i}
                assert time.monotonic() - started < 0.1
            started = time.monotonic()
            jobs = [gevent.spawn(client.call, 1, {"j": j}) for j in range(3)]
            gevent.joinall(jobs, raise_error=True, timeout=5)
            assert [job.value for job in jobs] == [{"j": j} for j in range(3)]
            assert time.monotonic() - started < 0.1
    finally:
        fake.close()


@pytest.mark.subprocess
def test_close_from_a_thread_while_threads_and_greenlets_wait(app_process):
    """Both worlds on shared connections (pool_size 1), waiting on slow replies; close() from another
    thread fails every call at once with MaybeExecuted (nobody waits out its timeout), then NotSent."""
    client = Client(app_process.address, timeout=5, pool_size=1, retries=0)
    client.call(client_app.ECHO, {})
    greenlets = [gevent.spawn(client.call, client_app.SLEEP, {"seconds": 3, "g": k}) for k in range(5)]
    threads = [in_thread(client.call, client_app.SLEEP, {"seconds": 3, "t": k}) for k in range(5)]
    wait_until(lambda: sum(p["inflight"] for pools in client.describe().values() for p in pools) >= 10, timeout=10)
    closer, _ = in_thread(client.close)
    started = time.monotonic()
    gevent.joinall(greenlets, timeout=5)
    wait_until(lambda: all(not t.is_alive() for t, _ in threads), timeout=5)
    closer.join(5)
    assert time.monotonic() - started < 1.5
    assert all(isinstance(g.exception, MaybeExecuted) for g in greenlets), [g.exception for g in greenlets]
    assert all(isinstance(out.get("error"), MaybeExecuted) for _, out in threads), threads
    with pytest.raises(NotSent):
        client.call(client_app.ECHO, {})


@pytest.mark.slow
@pytest.mark.subprocess
def test_server_killed_while_threads_and_greenlets_wait_on_shared_connections():
    proc = ServerProcess()
    try:
        client = Client(proc.address, timeout=5, pool_size=1, retries=0)
        client.call(client_app.ECHO, {})
        greenlets = [gevent.spawn(client.call, client_app.RECORD, {"tag": f"g{k}", "seconds": 3}) for k in range(5)]
        threads = [in_thread(client.call, client_app.RECORD, {"tag": f"t{k}", "seconds": 3}) for k in range(5)]
        wait_until(lambda: sum(p["inflight"] for pools in client.describe().values() for p in pools) >= 10,
                   timeout=10)
        started = time.monotonic()
        proc.kill()
        gevent.joinall(greenlets, timeout=5)
        wait_until(lambda: all(not t.is_alive() for t, _ in threads), timeout=5)
        assert time.monotonic() - started < 2
        assert all(isinstance(g.exception, MaybeExecuted) for g in greenlets), [g.exception for g in greenlets]
        assert all(isinstance(out.get("error"), MaybeExecuted) for _, out in threads), threads
        proc.start()  # a new server on the same port: both worlds reconnect
        assert client.call(client_app.ECHO, {"again": 1}) == {"again": 1}
        t, out = in_thread(client.call, client_app.ECHO, {"again": 2})
        wait_until(lambda: not t.is_alive(), timeout=10)
        assert out.get("value") == {"again": 2}, out
        client.close()
    finally:
        proc.close()


@pytest.mark.subprocess
def test_killed_waiters_never_leave_a_reply_to_another_greenlet(app_process):
    """Greenlets killed at random points of their call (queued, waiting, reading): the survivors get
    their own replies, and the connection keeps working."""
    with Client(app_process.address, timeout=5, pool_size=1, retries=0) as client:
        client.call(client_app.ECHO, {})
        for round_ in range(5):
            jobs = [gevent.spawn(client.call, client_app.SLEEP, {"seconds": 0.05 * (k % 3), "r": round_, "k": k})
                    for k in range(60)]
            gevent.sleep(0.01 * round_)
            victims = jobs[round_::4]
            gevent.killall(victims, block=False)
            gevent.joinall(jobs, timeout=10)
            for k, job in enumerate(jobs):
                assert job.dead
                if job.successful() and job not in victims:
                    assert job.value == {"seconds": 0.05 * (k % 3), "r": round_, "k": k}
                elif job not in victims:
                    raise AssertionError(job.exception)
        assert client.call(client_app.ECHO, {"end": 1}) == {"end": 1}


# -- review rv-client (session 6) -----------------------------------------------------------------

class _ReaderPopsMidIteration(dict[int, Call]):
    """``calls`` where the reader's lock-free pop of its own reply (``_lead``) lands, once, between
    ``iter()`` of the values and the first ``next()``: what a thread switch does there."""

    def __init__(self, calls: dict[int, Call], reader: int) -> None:
        super().__init__(calls)
        self.reader: int | None = reader

    def values(self) -> Any:
        view = super().values()
        outer = self

        class Values:
            def __iter__(self) -> Any:
                it = iter(view)
                if outer.reader is not None:
                    outer.pop(outer.reader)  # the reader, in another thread, takes its own call
                    outer.reader = None
                return it

        return Values()


@pytest.mark.parametrize("check", ["usable", "stalled"])
def test_a_checkout_never_fails_when_the_reader_pops_its_own_reply_meanwhile(app_process, check):
    """Review (rv-client): the lone-caller pass lets the reader pop its own call from ``calls``
    without the state lock, its docstring saying only ``_fail_locked`` can race it. But the checkout's
    ``usable()`` and ``stalled()`` read the oldest call as ``next(iter(calls.values()))``, two steps
    between which a thread switch lets the pop in: RuntimeError "dictionary changed size during
    iteration" out of another thread's ``Client.call`` (1 in 6 runs of
    ``test_f1_eight_threads_on_one_connection_never_see_errors``; located by traceback)."""
    with Client(app_process.address, timeout=5, retries=0, mode="threads", pool_size=1) as client:
        assert client.call(1, {"warm": 1}) == {"warm": 1}
        (conn,) = [c for b in client._balancers.values() for p in b.pools for c in p.conns]
        now = time.monotonic()
        oldest, reader = Call(0, now + 5, False), Call(0, now + 5, False)
        oldest.id, reader.id = 101, 102
        oldest.sent = reader.sent = now - 1.0  # a request older than STALL_AFTER, nothing read since
        conn.last_reply = now - 1.0
        conn.calls = _ReaderPopsMidIteration({101: oldest, 102: reader}, reader=102)
        if check == "usable":
            assert conn.usable(now, 1.0)
        else:
            conn.unordered = False  # stalled() is about request order
            assert conn.stalled(now)
        conn.calls = {}
