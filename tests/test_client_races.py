"""Review 4: the client's fast paths under races (threads and greenlets at once, cancellation, close, kill)."""

import ast
import json
import sys
import threading
import time

import gevent
import pytest

from geventtcp.client.call import Call, request_line
from geventtcp.client.client import Client
from geventtcp.codec import get_codec
from geventtcp.errors import MaybeExecuted, NotSent
from geventtcp.protocol import encode_request
from tests import client_app
from tests.clientutil import REPO, FakeServer, ServerProcess, env, in_thread
from tests.helpers import wait_until


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess()
    yield proc
    proc.close()


def test_stress_threads_and_greenlets_share_one_client(server):
    """8 threads + 100 greenlets, random timeouts (some below a sleeping handler's), kills and
    gevent.Timeouts, for 8 s: every reply the caller's own, no call late by more than 0.5 s."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "tests.client_stress", server.address, "8"], cwd=REPO,
                            env=env(), capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RESULT PASS" in result.stdout
    stats = ast.literal_eval(result.stdout.splitlines()[-2])  # the counters: only real work counts as a pass
    assert stats["ok"] > 500 and stats["timeout"] > 100 and stats["kills"] > 100, stats


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
    buf = []
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


def test_close_from_a_thread_while_threads_and_greenlets_wait(server):
    """Both worlds on shared connections (pool_size 1), waiting on slow replies; close() from another
    thread fails every call at once with MaybeExecuted (nobody waits out its timeout), then NotSent."""
    client = Client(server.address, timeout=5, pool_size=1, retries=0)
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


def test_killed_waiters_never_leave_a_reply_to_another_greenlet(server):
    """Greenlets killed at random points of their call (queued, waiting, reading): the survivors get
    their own replies, and the connection keeps working."""
    with Client(server.address, timeout=5, pool_size=1, retries=0) as client:
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
