"""Client throughput next to redis-py and gRPC, same machine, same run; prints a Markdown table.

    pip install redis grpcio && apt-get install redis-server   # the peers (not needed by the tests)
    python bench/client_bench.py [--seconds 3] [--rounds 3]

Rows (each the median of ``--rounds`` interleaved runs of ``--seconds``):

* geventtcp Client, 1 plain thread (no gevent hub, no patching), sync ping (builtin cmdid -1)
* the same with ``codec="orjson"`` (the ``[fast]`` extra; skipped if orjson is not installed)
* geventtcp Client, 100 greenlets sharing one Client (gevent sockets, not patched)
* geventtcp Client, 20 plain threads sharing one Client
* a raw blocking socket doing the same ping (the server's own round-trip floor, no client at all)
* redis-py ``PING`` against redis-server, 1 thread (skipped if redis-server is not installed)
* grpcio sync unary call, 1 thread (a generic-handler servicer, no codegen), server in a subprocess

With redis-server present, a paired measurement follows (:func:`paired`): our 1-thread call, the bare
protocol loop in Python (the floor of any Python client of this protocol) and redis-py ``PING``, in
interleaved slices of 500 calls, in the main thread and then in another thread; it prints each row's CPU
per call over redis-py's, per slice (median and quartiles): the figure for issue 14's CPU target.

Servers run in their own processes: ``geventtcp serve handlers -w 1``, ``redis-server``, and this
script with ``--grpc-server`` for gRPC. Issue 6 targets: 1-thread sync >= 1.5x redis-py PING;
100 greenlets >= 3x our own 1-thread rate.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchutil import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


Result = tuple[float, float]  # (calls per second, client-process CPU microseconds per call)


def rate(fn: Callable[[], object], seconds: float) -> Result:
    """Calls per second of ``fn`` in this thread, for ``seconds``, and the CPU each call cost."""
    n = 0
    end = time.perf_counter() + seconds
    started, cpu = time.perf_counter(), time.process_time()
    while True:
        for _ in range(50):
            fn()
        n += 50
        if time.perf_counter() >= end:
            return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6


def threaded_rate(make: Callable[[], Callable[[], object]], threads: int, seconds: float) -> Result:
    counts = [0] * threads
    stop = threading.Event()

    def run(i: int) -> None:
        fn = make()
        while not stop.is_set():
            for _ in range(20):
                fn()
            counts[i] += 20

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    started, cpu = time.perf_counter(), time.process_time()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    n = sum(counts)
    return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6


def bare_loop(port: int) -> Callable[[], object]:
    """The protocol in as little Python as it takes, for scale: format the line, send, poll, read, check the
    reply's head and parse its ``data``; no ids kept, no deadline, lock, pool or error handling. What the
    client's bookkeeping adds is the difference to this row."""
    import json
    import select

    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd, poller, scan = s.fileno(), select.poll(), json.JSONDecoder().scan_once  # type: ignore[attr-defined]
    poller.register(fd, select.POLLIN)
    ids = iter(range(1, 1 << 62))

    def call(cmdid: int = -1) -> Any:
        rid = next(ids)
        line = b'{"cmdid":%d,"timestamp":%d,"params":{},"id":%d,"timeout_ms":%d}\n' % (cmdid, time.time(), rid, 9950)
        s.send(line)
        poller.poll(10_000.0)
        data = os.read(fd, 65536)
        head = b'{"code":0,"cmdid":%d,"id":%d,"data":' % (cmdid, rid)
        if not data.startswith(head):
            raise RuntimeError(data)
        return scan(data.decode(), len(head))[0]

    return call


def paired(fns: dict[str, Callable[[], object]], seconds: float, calls: int = 500) -> dict[str, list[float]]:
    """CPU microseconds per call of each of ``fns``, measured in interleaved slices of ``calls`` calls
    (one slice of each in turn, for ``seconds``): rows a few milliseconds apart see the same machine, so
    the ratio of two rows moves far less with the machine's load than rows run seconds apart do. The
    calling thread's CPU time (``time.thread_time``), so it measures the thread it runs in."""
    slices: dict[str, list[float]] = {name: [] for name in fns}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for name, fn in fns.items():
            cpu = time.thread_time()
            for _ in range(calls):
                fn()
            slices[name].append((time.thread_time() - cpu) / calls * 1e6)
    return slices


def report_paired(address: str, port: int, redis_port: int, seconds: float, where: str) -> None:
    """Our 1-thread call, the bare loop and redis-py PING, paired (see :func:`paired`), in this thread."""
    import redis

    from geventtcp.client.client import Client

    with Client(address, timeout=10) as client, redis.Redis(host="127.0.0.1", port=redis_port) as r:
        fns: dict[str, Callable[[], object]] = {
            "geventtcp Client, sync ping": functools.partial(client.call, -1),
            "bare protocol loop in Python (the floor)": bare_loop(port),
            "redis-py PING": r.ping,
        }
        for fn in fns.values():
            fn()
        slices = paired(fns, seconds)
    theirs = slices["redis-py PING"]
    print(f"\nPaired, {where}: {len(theirs)} slices of 500 calls each, interleaved\n")
    print("| row | client CPU us/call (median slice) | / redis-py's, per slice: median [quartiles] |")
    print("|---|---:|---|")
    for name, ours in slices.items():
        q = statistics.quantiles([a / b for a, b in zip(ours, theirs, strict=True)], n=4)
        print(f"| {name} | {statistics.median(ours):.1f} | {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}] |")


# -- the gRPC peer --------------------------------------------------------------------------------

def grpc_server(port: int) -> None:
    from concurrent import futures

    import grpc

    def ping(request: bytes, context: Any) -> bytes:
        return b"PONG"

    handler = grpc.method_handlers_generic_handler("bench.Bench", {
        "Ping": grpc.unary_unary_rpc_method_handler(ping, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


# -- rows -----------------------------------------------------------------------------------------

def bench_threads(address: str, seconds: float, codec: str = "simplejson") -> Result:
    from geventtcp.client.client import Client
    from geventtcp.client.concurrency import THREADS, current_world

    with Client(address, timeout=10, codec=codec) as client:
        assert current_world() is THREADS
        client.call(-1)
        # A partial, not a lambda: redis-py's row times a bound method, and a lambda would add a Python
        # frame per call that only our row pays.
        return rate(functools.partial(client.call, -1), seconds)


def bench_20_threads(address: str, seconds: float) -> Result:
    from geventtcp.client.client import Client

    with Client(address, timeout=10, pool_size=4) as client:
        client.call(-1)
        return threaded_rate(lambda: lambda: client.call(-1), 20, seconds)


def bench_greenlets(address: str, seconds: float) -> Result:
    # A thread of its own, so that its gevent hub never touches the plain-threads rows.
    result: list[Result] = []

    def run() -> None:
        import gevent

        from geventtcp.client.client import Client

        with Client(address, timeout=10) as client:
            gevent.sleep(0)
            client.call(-1)
            counts = [0]
            stop: list[int] = []

            def worker() -> None:
                while not stop:
                    client.call(-1)
                    counts[0] += 1

            jobs = [gevent.spawn(worker) for _ in range(100)]
            started, cpu = time.perf_counter(), time.process_time()
            gevent.sleep(seconds)
            stop.append(1)
            gevent.joinall(jobs)
            n = counts[0]
            result.append((n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return result[0]


def bench_raw(port: int, seconds: float) -> Result:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        line = b'{"cmdid":-1,"id":1,"params":{}}\n'

        def once() -> None:
            s.sendall(line)
            data = s.recv(65536)
            while not data.endswith(b"\n"):
                data += s.recv(65536)

        return rate(once, seconds)


def bench_redis(port: int, seconds: float) -> Result:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    r.ping()
    try:
        return rate(r.ping, seconds)
    finally:
        r.close()


def bench_grpc(port: int, seconds: float) -> Result:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ping = channel.unary_unary("/bench.Bench/Ping")
        ping(b"PING", timeout=5)
        return rate(functools.partial(ping, b"PING", timeout=5), seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grpc-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grpc_server:
        grpc_server(args.grpc_server)
        return 0

    procs: list[subprocess.Popen[bytes]] = []
    ours, grpc_port = free_port(), free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "geventtcp", "serve", "handlers", "-b", f"127.0.0.1:{ours}",
                                   "-w", "1", "--log-level", "warning"], cwd=ROOT))
    procs.append(subprocess.Popen([sys.executable, __file__, "--grpc-server", str(grpc_port)], cwd=ROOT))
    redis_port = None
    if shutil.which("redis-server"):
        redis_port = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
    try:
        for port in (ours, grpc_port) + ((redis_port,) if redis_port else ()):
            wait_port(port)
        address = f"127.0.0.1:{ours}"
        rows: dict[str, Callable[[], Result]] = {
            "geventtcp Client, 1 thread, sync ping": lambda: bench_threads(address, args.seconds),
            "geventtcp Client, 1 thread, sync ping, orjson codec":
                lambda: bench_threads(address, args.seconds, "orjson"),
            "geventtcp Client, 100 greenlets, one Client": lambda: bench_greenlets(address, args.seconds),
            "geventtcp Client, 20 threads, one Client": lambda: bench_20_threads(address, args.seconds),
            "raw socket, 1 thread (server round-trip floor)": lambda: bench_raw(ours, args.seconds),
            "grpcio sync unary, 1 thread": lambda: bench_grpc(grpc_port, args.seconds),
        }
        try:
            import orjson  # noqa: F401
        except ImportError:
            del rows["geventtcp Client, 1 thread, sync ping, orjson codec"]
        if redis_port:
            rows["redis-py PING, 1 thread (redis-server)"] = lambda: bench_redis(redis_port, args.seconds)
        results: dict[str, list[Result]] = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, run in rows.items():
                results[name].append(run())
        median = {name: statistics.median(r[0] for r in values) for name, values in results.items()}
        cpu = {name: statistics.median(r[1] for r in values) for name, values in results.items()}
        one = median["geventtcp Client, 1 thread, sync ping"]
        print(f"\n{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.rounds} rounds x {args.seconds:g} s, "
              "medians\n")
        print("| client | calls/s | client CPU us/call | calls/s of each run |")
        print("|---|---:|---:|---|")
        for name, value in median.items():
            runs = ", ".join(f"{r[0]:,.0f}" for r in results[name])
            print(f"| {name} | {value:,.0f} | {cpu[name]:.1f} | {runs} |")
        print()
        if redis_port:
            redis_name = "redis-py PING, 1 thread (redis-server)"
            print(f"1-thread sync vs redis-py PING: {one / median[redis_name]:.2f}x calls/s (target >= 1.5x), "
                  f"{cpu[redis_name] / cpu['geventtcp Client, 1 thread, sync ping']:.2f}x less client CPU per call")
            # The two rows of one round ran seconds apart, so their ratio moves less with the machine's load
            # than a ratio of medians taken over different rounds.
            for name in [n for n in rows if n.startswith("geventtcp Client, 1 thread")]:
                ratios = [ours[1] / theirs[1] for ours, theirs in zip(results[name], results[redis_name], strict=True)]
                print(f"{name}: client CPU per call / redis-py PING's, each round: "
                      f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x "
                      "(issue 14 target <= 0.5x)")
        if redis_port:
            paired_seconds = args.seconds * args.rounds
            report_paired(address, ours, redis_port, paired_seconds, "the main thread")
            other = threading.Thread(target=report_paired,
                                     args=(address, ours, redis_port, paired_seconds, "another thread"))
            other.start()
            other.join()
            print()
        print(f"100 greenlets vs our 1 thread: {median['geventtcp Client, 100 greenlets, one Client'] / one:.2f}x "
              "(target >= 3x)")
        print(f"1-thread sync vs grpcio unary: {one / median['grpcio sync unary, 1 thread']:.2f}x")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
