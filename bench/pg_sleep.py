"""Waiting in PostgreSQL on ONE worker: 200 concurrent requests that each ``pg_sleep(0.05)``.

    pip install -e '.[test]' && apt-get install postgresql   # psycopg 3 + psycopg_pool; the server binaries
    python bench/pg_sleep.py [--requests 200] [--seconds 0.05] [--rounds 5] [--driver psycopg]

Run from a clone (the app is ``tests.support.dbapp``, the PostgreSQL ``tests.support.postgres``).
PostgreSQL is ``$GEVENTTCP_TEST_PG_DSN`` if set, else a private server started for the run
(``max_connections`` 300). The server is ``geventtcp serve tests.support.dbapp -w 1``: one worker,
one process, one event loop. With ``--driver psycopg`` (the default) each request borrows a
connection from a ``psycopg_pool.ConnectionPool`` of ``--requests`` connections opened before the
run, so every request can wait at once; ``--driver psycogreen`` opens one psycopg2 connection per
request (with ``psycogreen.gevent.patch_psycopg()``), ``--driver psycopg2`` shows the serial case.

One Client sends the requests from as many greenlets. Each round's wall time is set against the
serial time (``requests x seconds``: 10 s for the defaults) as ``serial / total``; a worker that
held its event loop in the driver would score 1.0, perfect overlap ``requests``. One warm-up
round, then ``--rounds`` rounds; min, median and max are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import gevent
from benchutil import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from geventtcp import Client  # noqa: E402
from tests.support import postgres  # noqa: E402


def one_round(client: Client, requests: int, seconds: float) -> float:
    started = time.monotonic()
    jobs = [gevent.spawn(client.call, 1, {"seconds": seconds}) for _ in range(requests)]
    gevent.joinall(jobs, raise_error=True)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=200, help="concurrent requests per round")
    parser.add_argument("--seconds", type=float, default=0.05, help="pg_sleep of each request")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--driver", choices=("psycopg", "psycogreen", "psycopg2"), default="psycopg")
    args = parser.parse_args()
    serial = args.requests * args.seconds
    with postgres.running() as dsn:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": ROOT, "DBAPP_PG_DSN": dsn, "DBAPP_DRIVER": args.driver,
               "DBAPP_POOL_SIZE": str(args.requests)}
        server = subprocess.Popen([sys.executable, "-m", "geventtcp", "serve", "tests.support.dbapp", "-w", "1",
                                   "-b", f"127.0.0.1:{port}", "--log-level", "warning"], cwd=ROOT, env=env)
        try:
            wait_port(port, timeout=60)
            with Client(f"127.0.0.1:{port}", timeout=max(60.0, serial * 2)) as client:
                client.call(1, {"seconds": 0}, timeout=120)  # the worker has imported the app: its pool is full
                one_round(client, args.requests, args.seconds)  # warm-up
                totals = [one_round(client, args.requests, args.seconds) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(timeout=30)
    median = statistics.median(totals)
    print(f"{args.requests} concurrent requests x pg_sleep({args.seconds:g}) on one worker, driver {args.driver}")
    print(f"serial time {serial:.2f} s; total per round: min {min(totals):.3f} s, median {median:.3f} s, "
          f"max {max(totals):.3f} s ({args.rounds} rounds)")
    print(f"ratio serial/total: {serial / median:.1f}x (median round; best {serial / min(totals):.1f}x, "
          f"perfect overlap {args.requests}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
