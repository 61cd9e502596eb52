"""Client instructions per call under valgrind callgrind (user space of the client process only).

    python bench/client_instructions.py [--calls 3000] [--shape thread|worker|orjson|greenlets|redis]

Starts ``geventtcp serve handlers -w 1`` (or ``redis-server`` for ``--shape redis``) in its own
process, then runs the client twice under callgrind, with ``--warmup`` calls and with ``--warmup +
--calls`` calls, and prints the difference divided by ``--calls``: start-up, imports and connecting
cancel out, leaving what one call costs. Instruction counts do not depend on the machine's load,
unlike the wall-clock rates of ``client_bench.py``. Shapes: ``thread`` (one plain thread, sync
ping, the default codec: the main thread, whose reads poll first), ``worker`` (the same from
another thread, whose reads are one ``recv`` bounded by ``SO_RCVTIMEO``), ``orjson`` (the same
with ``codec="orjson"``), ``greenlets`` (100 greenlets sharing one Client), ``redis`` (redis-py
``PING`` against redis-server, 1 thread).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from benchutil import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The client run under valgrind: argv is shape, port, number of calls.
CLIENT = r"""
import sys
shape, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if shape == "redis":
    import redis
    r = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(n):
        r.ping()
elif shape == "worker":
    import threading
    from geventtcp.client.client import Client
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        def worker():
            for _ in range(n):
                client.call(-1)
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
elif shape == "greenlets":
    import gevent
    from geventtcp.client.client import Client
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        def worker(k):
            for _ in range(k):
                client.call(-1)
        gevent.joinall([gevent.spawn(worker, n // 100) for _ in range(100)])
else:
    from geventtcp.client.client import Client
    with Client(f"127.0.0.1:{port}", timeout=30, codec="orjson" if shape == "orjson" else "simplejson") as client:
        for _ in range(n):
            client.call(-1)
"""


def instructions(shape: str, port: int, calls: int) -> int:
    """Instructions (Ir) of one client process making ``calls`` calls, under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c",
                              CLIENT, shape, str(port), str(calls)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", run.stderr)
        if found is None:
            raise RuntimeError(run.stderr)
        return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--shape", choices=("thread", "worker", "orjson", "greenlets", "redis"), default="thread")
    args = parser.parse_args()
    port = free_port()
    if args.shape == "redis":
        if not shutil.which("redis-server"):
            print("redis-server is not installed", file=sys.stderr)
            return 2
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    else:
        cmd = [sys.executable, "-m", "geventtcp", "serve", "handlers", "-b", f"127.0.0.1:{port}", "-w", "1",
               "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        base = instructions(args.shape, port, args.warmup)
        full = instructions(args.shape, port, args.warmup + args.calls)
        print(f"{args.shape}: {(full - base) / args.calls:,.0f} instructions per call "
              f"({args.calls} calls; {base:,} for {args.warmup}, {full:,} for {args.warmup + args.calls})")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
