"""The call budget: how many Python calls into geventtcp one echo request costs, server and client side.

Readability must not silently cost speed. Each Python call on the request path costs ~50 ns (a method
call with one argument, Python 3.11 on the development machine) against ~25 us of server CPU per
request, so a refactor that adds a helper call per request is cheap but not free, and ten of them are
a few per cent. These tests count, with ``sys.setprofile``, the ``call`` events whose code lies in the
geventtcp package (C calls, the handler and the test's own code are not counted) and fail when a
shape costs more than its budget below. The counts are deterministic: the per-request figure is the
floor of total calls / N, so a stray timer or one extra ``recv`` in a run of N cannot move it, while
one added call per request moves it by exactly one.

Raising a budget is a deliberate act: see docs/performance.md#call-budget. ``pytest -s`` prints the
measured numbers and the calls per request by function.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest

import geventtcp
from geventtcp import Registry, Server
from geventtcp.client.client import Client
from geventtcp.client.concurrency import THREADS, current_world
from tests.support.rawconn import RawConn
from tests.support.servers import ServerProcess

#: Calls into geventtcp per echo request, one request at a time on one connection (the reader parks
#: and is resumed by the read watcher for each request).
SERVER_LONE_BUDGET = 16
#: Calls into geventtcp per echo request, N requests pipelined in one write (per-read costs amortized).
SERVER_PIPELINED_BUDGET = 10
#: Calls into geventtcp per ``Client.call``, one caller in one thread (the threads world).
CLIENT_CALL_BUDGET = 12
#: What one added call costs (see the module docstring), for the failure message.
NS_PER_CALL = 50

N = 200
WARMUP = 50
LINE = b'{"cmdid":1,"timestamp":0,"params":{"content":"Hello world!"}}\n'
PACKAGE = os.path.dirname(os.path.abspath(geventtcp.__file__)) + os.sep


def echo(request: Any) -> Any:
    """The handler: counted by name (not as geventtcp code) to prove the profiler saw the reader greenlets."""
    return request.params


def hub_probe() -> None:
    """Run once from the hub's loop during a measurement: proves the hub greenlet is profiled too."""


@contextmanager
def counting() -> Iterator[collections.Counter[tuple[str, str]]]:
    """Count ``call`` events by (file, function) while the block runs: geventtcp's code, plus the two probes.

    ``sys.setprofile`` is per thread, and greenlets (the hub, every reader) share the thread, so one
    profile function sees all the server's greenlets; the tests check that with the probes.
    """
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    probes = (echo.__code__, hub_probe.__code__)

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(PACKAGE) or code in probes:
                counts[(os.path.basename(code.co_filename), code.co_name)] += 1

    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(None)


def per_request(counts: collections.Counter[tuple[str, str]], n: int) -> int:
    """Calls into geventtcp per request: the floor of the total over ``n`` (the probes not included)."""
    total = sum(c for (path, name), c in counts.items() if (path, name) not in _PROBES)
    return total // n


_PROBES = {("test_call_budget.py", "echo"), ("test_call_budget.py", "hub_probe")}


def check(shape: str, counts: collections.Counter[tuple[str, str]], n: int, budget: int) -> None:
    """Print the measurement; fail with the pointer to the docs when it is over ``budget``."""
    measured = per_request(counts, n)
    breakdown = ", ".join(f"{path}:{name} {c / n:g}" for (path, name), c in counts.most_common()
                          if (path, name) not in _PROBES)
    total = sum(counts.values()) - sum(counts[probe] for probe in _PROBES)
    print(f"\ncall budget, {shape}: {measured} calls into geventtcp per request (budget {budget}; "
          f"{total} calls for {n} requests); per request: {breakdown}")
    assert measured <= budget, (
        f"{shape}: measured {measured} > budget {budget} calls per request; every added call costs "
        f"~{NS_PER_CALL} ns on the hot path, see docs/performance.md#call-budget. Per request: {breakdown}")


@pytest.fixture
def echo_server(serve: Callable[..., Server]) -> Server:
    registry = Registry()
    registry.add(1, echo, name="echo")
    return serve(registry)


def pipelined(conn: RawConn, n: int) -> None:
    conn.send(LINE * n)
    for _ in range(n):
        assert conn.readline().startswith(b'{"code":0,')


def lone(conn: RawConn, n: int) -> None:
    for _ in range(n):
        conn.send(LINE)
        assert conn.readline().startswith(b'{"code":0,')


@pytest.mark.parametrize(("shape", "run", "budget"), [
    ("server, lone requests", lone, SERVER_LONE_BUDGET),
    ("server, 200 pipelined in one write", pipelined, SERVER_PIPELINED_BUDGET),
])
def test_server_calls_per_echo_request_stay_within_budget(
        echo_server: Server, shape: str, run: Callable[[RawConn, int], None], budget: int) -> None:
    with RawConn(echo_server.address[:2]) as conn:
        run(conn, WARMUP)
        with counting() as counts:
            echo_server.loop.run_callback(hub_probe)
            run(conn, N)
    # Every greenlet that runs server code was profiled: each reader (the handler ran N times in
    # them) and the hub (its callback ran).
    assert counts[("test_call_budget.py", "echo")] == N
    assert counts[("test_call_budget.py", "hub_probe")] == 1
    check(shape, counts, N, budget)


@pytest.mark.slow
@pytest.mark.subprocess
def test_client_calls_per_call_stay_within_budget() -> None:
    server = ServerProcess()  # in its own process: only the client's calls are counted here
    measured: list[collections.Counter[tuple[str, str]]] = []

    def caller() -> None:
        # A thread of its own: no gevent hub there, so the client runs in the threads world (the
        # pytest thread may have a hub from the in-process servers, which would make it gevent's).
        assert current_world() is THREADS
        with Client(server.address, timeout=10) as client:
            for _ in range(WARMUP):
                client.call(1, {"content": "Hello world!"})
            with counting() as counts:
                for _ in range(N):
                    assert client.call(1, {"content": "Hello world!"}) == {"content": "Hello world!"}
        measured.append(counts)

    try:
        thread = threading.Thread(target=caller)
        thread.start()
        thread.join(60)
    finally:
        server.close()
    assert measured, "the calling thread failed (see its traceback above)"
    counts = measured[0]
    assert counts[("client.py", "call")] == N  # the profiler saw every call
    check("client, one thread, Client.call", counts, N, CLIENT_CALL_BUDGET)
