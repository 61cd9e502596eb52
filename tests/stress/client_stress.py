"""Client stress (``python -m tests.stress.client_stress ADDRESS SECONDS``, server: tests.support.client_app_server).

Real threads and greenlets (no patching) share one Client, with random per-call timeouts, some shorter
than a sleeping handler, random greenlet kills and gevent.Timeouts. Every reply must be the caller's
own (unique tokens), no call may outlive its timeout by more than SLACK, nothing may hang, and the hub
must report no error (a Waiter switched into a greenlet that moved on would show there). Prints
``RESULT PASS`` or ``RESULT FAIL``. Env: THREADS (8), GREENLETS (100), POOL (4), SWITCH (the
interpreter's switch interval, lowered to preempt threads more often).
"""

from __future__ import annotations

import collections
import itertools
import os
import random
import sys
import threading
import time
from typing import Any

import gevent

from geventtcp.client.client import Client
from geventtcp.errors import CallTimeout, DeadlineExceeded

SLACK = 0.5


class Stress:
    def __init__(self, address: str, duration: float) -> None:
        self.client = Client(address, timeout=5, pool_size=int(os.environ.get("POOL", 4)), retries=0)
        self.lock = threading.Lock()
        self.stats: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []
        self.seq = itertools.count()
        self.stop_at = time.monotonic() + duration

    def note(self, kind: str, detail: str | None = None) -> None:
        with self.lock:
            self.stats[kind] += 1
            if detail is not None and len(self.problems) < 20:
                self.problems.append(detail[:300])

    def one_call(self, rng: random.Random, who: str) -> None:
        token = f"{who}-{next(self.seq)}"
        timeout = rng.choice((0.05, 0.1, 0.3, 1.0, 2.0))
        params: dict[str, Any]
        if rng.random() < 0.3:
            cmdid, params = 2, {"t": token, "seconds": rng.choice((0.02, 0.1, 0.25, 0.5))}
        else:
            cmdid, params = 1, {"t": token, "pad": "x" * rng.choice((0, 10, 1000))}
        start = time.monotonic()
        got: Any
        try:
            got = self.client.call(cmdid, params, timeout=timeout)
        except (CallTimeout, DeadlineExceeded) as exc:
            self.note("timeout")
            got = exc
        except Exception as exc:  # any other error is a finding: the server stays up throughout
            self.note("error:" + type(exc).__name__, f"{who} {cmdid} {params} {exc!r}")
            got = exc
        else:
            if got != params:
                self.note("WRONG REPLY", f"{who} sent {params} got {got}")
            else:
                self.note("ok")
        late = time.monotonic() - start - timeout
        if late > SLACK:
            self.note("LATE", f"{who} {cmdid} {params} timeout={timeout} late by {late:.2f}s: {got!r}")

    def thread_worker(self, k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < self.stop_at:
            self.one_call(rng, f"T{k}")

    def greenlet_worker(self, k: int, rng: random.Random) -> None:
        while time.monotonic() < self.stop_at:
            if rng.random() < 0.1:
                try:
                    with gevent.Timeout(rng.choice((0.01, 0.05, 0.2))):
                        self.one_call(rng, f"G{k}")
                except gevent.Timeout:
                    self.note("gevent.Timeout")
            else:
                self.one_call(rng, f"G{k}")

    def run(self, threads: int, greenlets: int) -> bool:
        hub = gevent.get_hub()
        original = hub.print_exception

        def print_exception(context: Any, kind: Any, value: Any, tb: Any) -> None:
            self.note("HUB ERROR", f"{context}: {kind.__name__}: {value}")
            original(context, kind, value, tb)

        hub.print_exception = print_exception
        workers = [threading.Thread(target=self.thread_worker, args=(k,)) for k in range(threads)]
        for t in workers:
            t.start()
        rng = random.Random(1)
        jobs = {k: gevent.spawn(self.greenlet_worker, k, random.Random(1000 + k)) for k in range(greenlets)}
        while time.monotonic() < self.stop_at:
            gevent.sleep(rng.uniform(0.005, 0.05))
            k = rng.randrange(greenlets)
            jobs[k].kill(block=False)  # lands wherever the greenlet is: queued, writing, waiting, reading
            self.note("kills")
            jobs[k] = gevent.spawn(self.greenlet_worker, k, random.Random(rng.random()))
        gevent.joinall(list(jobs.values()), timeout=30)
        for t in workers:
            t.join(30)
        alive = [str(k) for k, job in jobs.items() if not job.dead] + [t.name for t in workers if t.is_alive()]
        if alive:
            self.note("HUNG", f"still running: {alive}")
        gevent.sleep(1.0)  # abandoned requests' replies come in; then each world still works
        if self.client.call(1, {"last": 1}) != {"last": 1}:
            self.note("LAST GREENLET CALL FAILED")
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.setdefault("v", self.client.call(1, {"last": 2})))
        t.start()
        t.join(10)
        if out.get("v") != {"last": 2}:
            self.note("LAST THREAD CALL FAILED", repr(out))
        for world, pools in self.client.describe().items():
            print(world, pools)
        self.client.close()
        print(dict(self.stats))
        for problem in self.problems:
            print("  ", problem)
        bad = [k for k in self.stats if k.isupper() or k.startswith("error")]
        print("RESULT", "FAIL" if bad else "PASS", bad)
        return not bad


def main() -> None:
    if os.environ.get("SWITCH"):
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    stress = Stress(sys.argv[1], float(sys.argv[2]))
    ok = stress.run(int(os.environ.get("THREADS", 8)), int(os.environ.get("GREENLETS", 100)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
