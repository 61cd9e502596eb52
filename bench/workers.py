"""``--workers N`` against ``--workers 1`` in the 50x1 shape, in alternating pairs, with where the CPU goes.

    gcc -O2 -o /tmp/geventtcp-lg bench/lg.c
    python bench/workers.py [--workers 2] [--pairs 5] [--seconds 5]

Each pair starts ``geventtcp serve handlers --workers 1`` and then ``--workers N`` on a fresh port,
drives each with the C load generator (``lg -c 50 -d 1``) after a 2 s warm-up, and reads from
``/proc`` the CPU time and voluntary context switches (sleeps) of the worker processes and the
load generator's CPU time. Prints one row per run and the median ratio (issue 6: N=2 >= 1.5x).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys

from benchutil import free_port, wait_port

LG = os.environ.get("LG", "/tmp/geventtcp-lg")
MESSAGE = '{"cmdid":1,"timestamp":0,"params":{"content":"Hello world!"}}'
TICK = os.sysconf("SC_CLK_TCK")


def lg(port: int, seconds: float) -> str:
    cmd = [LG, "127.0.0.1", str(port), "-c", "50", "-d", "1", "-t", str(seconds), "-w", "0", "-m", MESSAGE]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def worker_counters(pids: list[int]) -> tuple[float, int]:
    """CPU seconds (user + system) and voluntary context switches of ``pids``, summed."""
    cpu, sleeps = 0.0, 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        with open(f"/proc/{pid}/status") as f:
            found = re.search(r"voluntary_ctxt_switches:\s+(\d+)", f.read())
        sleeps += int(found.group(1)) if found else 0
    return cpu, sleeps


def run(workers: int, seconds: float) -> dict[str, float]:
    """One measured run of ``--workers workers``: req/s, server CPU per request, cores, sleeps."""
    port = free_port()
    master = subprocess.Popen(
        [sys.executable, "-m", "geventtcp", "serve", "handlers", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        lg(port, 2)  # warm-up: every worker has imported, accepted and answered
        children = subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True, text=True).stdout
        pids = [int(p) for p in children.split()]
        cpu0, sleeps0 = worker_counters(pids)
        lg0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = lg(port, seconds)
        lg1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1, sleeps1 = worker_counters(pids)
    finally:
        master.terminate()
        master.wait(timeout=30)
    done = int(re.search(r"completed=(\d+)", out).group(1))  # type: ignore[union-attr]
    lg_cpu = (lg1.ru_utime - lg0.ru_utime) + (lg1.ru_stime - lg0.ru_stime)
    return {"rps": done / seconds, "cpu_us": (cpu1 - cpu0) / done * 1e6, "cores": (cpu1 - cpu0) / seconds,
            "lg_cores": lg_cpu / seconds, "sleeps": (sleeps1 - sleeps0) / done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not os.access(LG, os.X_OK):
        print(f"no load generator at {LG}: gcc -O2 -o {LG} bench/lg.c (or set LG)", file=sys.stderr)
        return 2
    print(f"{os.cpu_count()} CPUs; 50 connections, 1 in flight; {args.pairs} pairs of {args.seconds:g} s\n")
    print("| workers | req/s | server CPU us/req | server cores | load generator cores | sleeps/req |")
    print("|---:|---:|---:|---:|---:|---:|")
    rates: dict[int, list[float]] = {1: [], args.workers: []}
    for _ in range(args.pairs):
        for n in (1, args.workers):
            r = run(n, args.seconds)
            rates[n].append(r["rps"])
            print(f"| {n} | {r['rps']:,.0f} | {r['cpu_us']:.1f} | {r['cores']:.2f} | {r['lg_cores']:.2f} | "
                  f"{r['sleeps']:.3f} |", flush=True)
    one, many = statistics.median(rates[1]), statistics.median(rates[args.workers])
    ratios = sorted(b / a for a, b in zip(rates[1], rates[args.workers], strict=True))
    print(f"\n--workers {args.workers} / --workers 1: {many / one:.2f}x (medians {many:,.0f} / {one:,.0f} req/s;"
          f" pairs {ratios[0]:.2f}x-{ratios[-1]:.2f}x; issue 6 target 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
