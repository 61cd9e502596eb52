"""The three worlds: plain threads (never patched), gevent monkey-patched, greenlets without patching."""

import threading
import time

import gevent
import pytest

from geventtcp.client.client import Client
from geventtcp.client.concurrency import THREADS, GeventWorld, current_world
from tests.support import client_app
from tests.support.servers import addr, serve
from tests.support.system import run_python

THREADS_WORLD = r"""
import sys, threading, random
from concurrent.futures import Future
from geventtcp.client.client import Client
from geventtcp.client.concurrency import current_world, THREADS
from geventtcp.errors import CallTimeout, RemoteError
import gevent.monkey, gevent._hub_local as hub_local

client = Client(ADDRESS, timeout=10, pool_size=4)
errors = []

def worker(k):
    try:
        assert current_world() is THREADS
        rng = random.Random(k)
        for i in range(40):
            params = {"k": k, "i": i, "seconds": rng.choice((0, 0, 0.002))}
            assert client.call(2, params) == params
        assert hub_local.get_hub_if_exists() is None  # no gevent hub was ever needed in this thread
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=worker, args=(k,)) for k in range(20)]
for t in threads: t.start()
for t in threads: t.join(60)
assert not errors, errors
assert not gevent.monkey.is_module_patched("socket")

future = client.call_async(1, {"async": True})
assert isinstance(future, Future) and future.result(5) == {"async": True}
# a timeout mid-call, then a new call on the same connection gets its own reply
try:
    client.call(4, {"tag": "late", "seconds": 2}, timeout=0.2)
except (CallTimeout, RemoteError) as exc:
    pass
else:
    raise AssertionError("no timeout")
assert client.call(1, {"after": "timeout"}) == {"after": "timeout"}
client.send(1, {"fire": True})
assert client.call(1, {"n": 1}) == {"n": 1}
client.close()

# 20 threads on ONE connection (leader/follower hand-offs), a third of the calls timing out mid-call:
# every call that returns gets its own reply.
shared = Client(ADDRESS, timeout=10, pool_size=1)
outcomes = {"ok": 0, "timeout": 0}
lock = threading.Lock()

def contender(k):
    try:
        rng = random.Random(k)
        for i in range(15):
            slow = rng.random() < 0.33
            params = {"k": k, "i": i, "seconds": 0.05 if slow else 0}
            try:
                got = shared.call(2, params, timeout=0.02 if slow else 5)
            except (CallTimeout, RemoteError):
                with lock: outcomes["timeout"] += 1
                continue
            assert got == params, (got, params)
            with lock: outcomes["ok"] += 1
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=contender, args=(k,)) for k in range(20)]
for t in threads: t.start()
for t in threads: t.join(60)
assert not errors, errors
assert outcomes["ok"] > 100 and outcomes["timeout"] > 20, outcomes
(pool,) = shared.describe()["threads"]
assert pool["connections"] == 1, pool
shared.close()
print("threads ok")
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_plain_threads_world_without_gevent_patching(app_process):
    result = run_python(THREADS_WORLD.replace("ADDRESS", repr(app_process.address)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "threads ok"


PATCHED_WORLD = r"""
from gevent import monkey; monkey.patch_all()
import threading, gevent
from gevent.event import AsyncResult
from geventtcp.client.client import Client
from geventtcp.client.concurrency import current_world, GeventWorld

client = Client(ADDRESS, timeout=10, pool_size=2)
assert isinstance(current_world(), GeventWorld)

def greenlet_worker(k):
    for i in range(20):
        assert client.call(1, {"g": k, "i": i}) == {"g": k, "i": i}

def thread_worker(k, out):
    for i in range(20):  # a patched thread is a greenlet: time.sleep in the server yields
        assert client.call(2, {"t": k, "i": i, "seconds": 0.001}) == {"t": k, "i": i, "seconds": 0.001}
    out.append(k)

done = []
threads = [threading.Thread(target=thread_worker, args=(k, done)) for k in range(20)]
for t in threads: t.start()
jobs = [gevent.spawn(greenlet_worker, k) for k in range(100)]
gevent.joinall(jobs, raise_error=True, timeout=60)
for t in threads: t.join(60)
assert sorted(done) == list(range(20))
future = client.call_async(1, {"async": 1})
assert isinstance(future, AsyncResult) and future.result(5) == {"async": 1}
(pools,) = client.describe().values()
assert pools[0]["connections"] <= 2, pools
print("patched ok")
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_gevent_monkey_patched_world(app_process):
    result = run_python(PATCHED_WORLD.replace("ADDRESS", repr(app_process.address)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "patched ok"


def test_greenlets_without_patching_use_gevent_sockets():
    from gevent import monkey

    assert not monkey.is_module_patched("socket")
    with serve(client_app.registry) as srv, Client(addr(srv), timeout=5) as client:
        world = current_world()
        assert isinstance(world, GeventWorld) and world.key is gevent.get_hub()
        # While one greenlet waits on a slow call, the hub keeps running others (and the server);
        # the server answers a connection in order, so later calls go on another connection.
        slow = gevent.spawn(client.call, 2, {"seconds": 0.3})
        gevent.sleep(0.1)
        fast = [gevent.spawn(client.call, 1, {"i": i}) for i in range(50)]
        gevent.joinall(fast, raise_error=True, timeout=5)
        assert not slow.ready()
        assert slow.get(timeout=5) == {"seconds": 0.3}
        conn = next(iter(client._balancers.values())).pools[0].conns[0]
        assert type(conn.sock).__module__.startswith("gevent")


def test_a_real_thread_without_a_hub_is_in_the_threads_world():
    result = gevent.get_hub().threadpool.apply(current_world)
    assert result is THREADS
    assert current_world("threads") is THREADS
    assert isinstance(current_world("gevent"), GeventWorld)


def test_one_client_shared_by_greenlets_and_real_threads_at_once():
    """Each world gets its own connections; both work at the same time through one Client."""
    with serve(client_app.registry) as srv, Client(addr(srv), timeout=10) as client:
        pool = gevent.get_hub().threadpool

        def in_thread(k):
            return [client.call(1, {"t": k, "i": i}) for i in range(10)]

        threads = [pool.spawn(in_thread, k) for k in range(4)]
        greenlets = [gevent.spawn(client.call, 1, {"g": i}) for i in range(20)]
        gevent.joinall(greenlets, raise_error=True, timeout=10)
        assert [t.get(timeout=10) for t in threads] == [[{"t": k, "i": i} for i in range(10)] for k in range(4)]
        assert {"threads"} < set(client.describe())


# -- GeventSignal: the gevent world's per-caller wake-up --------------------------------------------

def _signal():
    return current_world("gevent").signal()


def test_gevent_signal_times_out_and_a_release_before_the_wait_is_kept():
    sig = _signal()
    started = time.monotonic()
    assert sig.acquire(True, 0.05) is False
    assert 0.04 < time.monotonic() - started < 1.0
    assert sig.acquire(False) is False and sig.acquire(True, 0) is False
    sig.release()
    assert sig.acquire(True, 5) is True  # at once: the release came first
    assert sig.acquire(False) is False  # consumed


def test_gevent_signal_release_wakes_the_waiter_at_once():
    sig = _signal()
    waiter = gevent.spawn(lambda: (sig.acquire(True, 5), time.monotonic()))
    gevent.sleep(0.02)
    released = time.monotonic()
    sig.release()
    woken, at = waiter.get(timeout=5)
    assert woken is True and at - released < 1.0
    assert sig.acquire(False) is False


@pytest.mark.parametrize("first", ["release", "timer"])
def test_gevent_signal_release_and_timer_in_one_turn_never_wake_a_later_wait(first):
    """The wait's timer and a release come due in the same loop turn, in either order: the wait
    reports one of them, a release is never lost, and the stray second wake-up never cuts short
    what the greenlet blocks on next (here a sleep)."""
    sig = _signal()

    def waiter():
        woken = sig.acquire(True, 0.001)
        consumed = woken or sig.acquire(False)
        started = time.monotonic()
        gevent.sleep(0.1)
        return consumed, time.monotonic() - started

    g = gevent.spawn(waiter)
    gevent.sleep(0)  # the waiter is now waiting
    if first == "timer":  # a release from a timer due just before the wait's own (same loop time):
        # the release queues its wake-up callback, then the wait's timer wakes the greenlet first
        releaser = gevent.get_hub().loop.timer(0.0005)
        releaser.start(sig.release)
    time.sleep(0.01)  # block the hub past both deadlines: everything fires in the next turn
    if first == "release":
        sig.release()
    consumed, slept = g.get(timeout=5)
    assert slept >= 0.09
    if first == "release":
        assert consumed is True
    else:
        assert consumed is True
        releaser.close()


def test_gevent_signal_released_from_another_thread_wakes_the_greenlet_promptly():
    sig = _signal()
    threading.Timer(0.05, sig.release).start()
    started = time.monotonic()
    assert sig.acquire(True, 10) is True
    assert time.monotonic() - started < 2.0


def test_gevent_signal_killed_waiter_leaves_and_a_later_release_is_kept():
    sig = _signal()
    g = gevent.spawn(sig.acquire, True, 10)
    gevent.sleep(0.01)
    g.kill(block=True, timeout=5)
    assert g.dead and isinstance(g.value, gevent.GreenletExit)
    sig.release()
    assert sig.acquire(False) is True
