"""Fast calls mixed with slow ones on one shared gevent Client: what a slow call costs the fast ones (issue 14).

    python bench/mixed.py [--workers 1 2] [--slow 0 20] [--seconds 4] [--greenlets 100]

Starts ``geventtcp serve handlers --workers N`` and, in this (monkey-patched) process, runs
``--greenlets`` greenlets sharing one ``Client`` for ``--seconds``: each call is Sleep(0.05)
(cmdid 2) with probability ``--slow`` percent, else Echo (cmdid 1). Prints one Markdown row per
(workers, client, slow share): fast-call p50/p90/p99 in ms, calls per second (all calls), and the
share of the run's requests each worker served (from the ``workers`` of STATS, before and after).

Clients compared:

* ``ordered``: ``Client(unordered=False)``: no HELLO, so request order and the pool of a server
  before 1.1 (greenlets fill one connection up to ``multiplex``, 128, before another is opened):
  the Client before issue 14.
* ``1.1``: the default Client: completion order (HELLO) and a connection per worker, balanced by
  requests in flight per worker.

Issue 14's targets: with 20 % slow calls, fast-call p90 at most 3x the all-fast p90; with
``--workers 2`` each worker serves 35-65 % of one Client's requests.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from benchutil import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from geventtcp import Client  # noqa: E402

CLIENTS: dict[str, dict[str, Any]] = {
    "ordered": {"unordered": False},
    "1.1": {},
}
SLOW_SECONDS = 0.05


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def worker_requests(client: Client) -> dict[int, int]:
    """Requests served so far per worker pid (STATS under the launcher lists every worker, the other
    workers as of their last snapshot, written about once a second: wait for a fresh one)."""
    time.sleep(1.5)
    return {w["pid"]: w["requests"] for w in client.stats()["workers"]}


def run(address: str, kind: str, slow_percent: float, greenlets: int, seconds: float) -> dict[str, Any]:
    fast_ms: list[float] = []
    calls = 0
    with Client(address, timeout=10, **CLIENTS[kind]) as client:
        warm = [gevent.spawn(client.call, 1, {}) for _ in range(greenlets)]  # connections opened
        gevent.joinall(warm, raise_error=True)
        with Client(address, timeout=10, pool_size=1) as probe:  # STATS off the measured client
            before = worker_requests(probe)
            stop = time.monotonic() + seconds
            started = time.monotonic()

            def caller(seed: int) -> None:
                nonlocal calls
                rng = random.Random(seed)
                while time.monotonic() < stop:
                    if rng.random() * 100 < slow_percent:
                        client.call(2, {"seconds": SLOW_SECONDS})
                    else:
                        t0 = time.perf_counter()
                        client.call(1, {"k": seed})
                        fast_ms.append((time.perf_counter() - t0) * 1000)
                    calls += 1

            jobs = [gevent.spawn(caller, k) for k in range(greenlets)]
            gevent.joinall(jobs, raise_error=True)
            elapsed = time.monotonic() - started
            after = worker_requests(probe)
    served = {pid: after.get(pid, 0) - before.get(pid, 0) for pid in after}
    total = sum(served.values()) or 1
    shares = sorted((100.0 * n / total for n in served.values()), reverse=True)
    return {
        "p50": percentile(fast_ms, 0.50), "p90": percentile(fast_ms, 0.90), "p99": percentile(fast_ms, 0.99),
        "rate": calls / elapsed, "fast": len(fast_ms), "shares": shares,
    }


def serve(workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "geventtcp", "serve", "handlers", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(1.0)  # every worker is up and accepting
    return proc, f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slow", type=float, nargs="+", default=[0.0, 20.0], help="percent of slow calls")
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=list(CLIENTS))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--greenlets", type=int, default=100)
    args = parser.parse_args()
    print(f"{args.greenlets} greenlets on one Client, slow call = Sleep({SLOW_SECONDS}), {args.seconds:g} s per row\n")
    print("| workers | client | slow % | fast p50 ms | fast p90 ms | fast p99 ms | p90 / all-fast p90 | calls/s "
          "| worker shares % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workers in args.workers:
        proc, address = serve(workers)
        try:
            for kind in args.clients:
                base: float | None = None
                for slow in args.slow:
                    r = run(address, kind, slow, args.greenlets, args.seconds)
                    if slow == 0:
                        base = r["p90"]
                    ratio = f"{r['p90'] / base:.1f}x" if base else "-"
                    shares = " / ".join(f"{s:.0f}" for s in r["shares"])
                    print(f"| {workers} | {kind} | {slow:g} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} "
                          f"| {ratio} | {r['rate']:.0f} | {shares} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
