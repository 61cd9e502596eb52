"""Soak test: mixed good, malformed, oversized, slow and vanishing clients against a launcher; RSS and fds over time.

Starts ``geventtcp serve handlers`` (the example app) with ``--workers`` workers, drives it for
``--duration`` seconds and samples, every ``--interval`` seconds, the resident memory and open file
descriptors of the master and its workers. Traffic, per client loop iteration:

    ~95 %  good: echo / short sleep calls on persistent connections (replies checked)
    ~1 %   malformed line (invalid JSON, bad UTF-8, NaN, deep nesting): expects 400, then a good call
    ~1 %   oversized line (2 MiB): expects 413, then a good call on the same connection
    ~1 %   slow client: half a line, then silence: expects the 408 line and EOF
    ~1 %   disconnect: writes requests and closes without reading
    ~1 %   blank lines: 1000 newlines, then a good call on the same connection; and a connection
           that sends only newlines (4096), which expects the 400 line and EOF
    ~1 %   blocked-head pipeline: a 0.1 s sleep, then 30 echo lines of 32 KiB in one write, then
           every reply read back, in order
    ~1 %   poisoned params: a lone surrogate or duplicate keys, valid JSON the server refuses:
           expects 400 carrying the request's id, then a good call on the same connection

It fails (exit 1) when a reply is wrong, a fault is not answered as documented, or after warm-up
(the first quarter of the run) RSS grows more than ``--max-rss-growth`` percent or open fds more
than ``--max-fd-growth``. Example: ``python bench/soak.py --duration 600`` (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import gevent
from gevent import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MALFORMED = [b'{"cmdid":1,', b'{"cmdid":1,"params":{"s":"\xff"}}', b'{"cmdid":1,"params":{"x":NaN}}',
             b"[" * 5000, b'{"cmdid":1} trailing', b'\xef\xbb\xbf{"cmdid":1}']
#: Valid JSON the server refuses; each carries an id (``%d``) the 400 must echo.
POISONED = [b'{"cmdid":1,"id":%d,"params":{"name":"\\udc80"}}', b'{"cmdid":1,"id":%d,"params":{"a":1,"a":2}}']


def family(pid: int) -> list[int]:
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            for child in fh.read().split():
                pids += family(int(child))
    except OSError:
        pass
    return pids


def sample(master: int) -> tuple[int, int, int]:
    """(total RSS KiB, total open fds, process count) of the master and its workers."""
    rss = fds = 0
    pids = family(master)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                rss += next(int(r.split()[1]) for r in fh if r.startswith("VmRSS:"))
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            pass
    return rss, fds, len(pids)


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def fail(self, what: str) -> None:
        self.failures.append(what)


class Conn:
    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.buf = b""

    def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n")
        value: dict[str, Any] = json.loads(raw)
        return value

    def call(self, body: bytes) -> dict[str, Any] | None:
        self.sock.sendall(body + b"\n")
        return self.line()

    def close(self) -> None:
        self.sock.close()


def good_call(conn: Conn, n: int, tally: Tally) -> None:
    if n % 10 == 0:
        reply = conn.call(b'{"cmdid":2,"id":%d,"params":{"seconds":0.005}}' % n)
    else:
        reply = conn.call(b'{"cmdid":1,"id":%d,"params":{"n":%d,"pad":"%s"}}' % (n, n, b"p" * (n % 200)))
    if reply is None or reply.get("code") != 0 or reply.get("id") != n:
        if reply is not None and reply.get("goaway"):
            raise ConnectionError("goaway")
        tally.fail(f"good call {n}: {reply!r}")
    tally.add("good")


def blank_flood(address: tuple[str, int], conn: Conn, tally: Tally) -> None:
    """Blank lines below the server's bound cost nothing; a connection sending nothing else is closed."""
    conn.sock.sendall(b"\n" * 1000)
    flood = Conn(address)
    try:
        flood.sock.sendall(b"\n" * 4096)
        reply = flood.line()
        if reply is None or reply.get("code") != 400 or flood.line() is not None:
            tally.fail(f"blank-line flood got {reply!r}")
    except OSError as exc:  # the close is lingering (no reset expected): count it as a failure
        tally.fail(f"blank-line flood: {exc!r}")
    finally:
        flood.close()
    tally.add("blank")


def blocked_head(conn: Conn, n: int, tally: Tally) -> None:
    """A slow request at the head of a pipeline of large ones: every reply comes back, in order."""
    pad = b"b" * (32 << 10)
    lines = [b'{"cmdid":2,"id":%d,"params":{"seconds":0.1}}\n' % n]
    lines += [b'{"cmdid":1,"id":%d,"params":{"pad":"%s"}}\n' % (n * 100 + i, pad) for i in range(30)]
    conn.sock.sendall(b"".join(lines))
    expected = [n] + [n * 100 + i for i in range(30)]
    got = [reply.get("id") if reply is not None else None for reply in (conn.line() for _ in expected)]
    if got != expected:
        tally.fail(f"blocked-head pipeline: ids {got[:5]}... not {expected[:5]}...")
    tally.add("blocked_head")


def client_loop(address: tuple[str, int], until: float, tally: Tally, rng: random.Random) -> None:
    conn: Conn | None = None
    n = 0
    while time.monotonic() < until:
        n += 1
        try:
            if conn is None:
                conn = Conn(address)
            roll = rng.random()
            if roll < 0.01:
                reply = conn.call(rng.choice(MALFORMED))
                if reply is None or reply.get("code") != 400:
                    tally.fail(f"malformed line got {reply!r}")
                tally.add("malformed")
            elif roll < 0.02:
                reply = conn.call(b'{"cmdid":1,"params":{"s":"' + b"x" * (2 << 20) + b'"}}')
                if reply is None or reply.get("code") != 413:
                    tally.fail(f"oversized line got {reply!r}")
                tally.add("oversized")
            elif roll < 0.03:
                gevent.spawn(slow_client, address, tally)
            elif roll < 0.04:
                gone = Conn(address)
                gone.sock.sendall(b'{"cmdid":2,"params":{"seconds":0.01}}\n' * 5)
                gone.close()
                tally.add("disconnect")
            elif roll < 0.05:
                blank_flood(address, conn, tally)
            elif roll < 0.06:
                blocked_head(conn, n, tally)
            elif roll < 0.07:
                reply = conn.call(POISONED[n % len(POISONED)] % n)
                if reply is None or reply.get("code") != 400 or reply.get("id") != n:
                    tally.fail(f"poisoned params got {reply!r}")
                tally.add("poisoned")
            good_call(conn, n, tally)
        except (OSError, ConnectionError) as exc:
            tally.add("reconnect")
            if not str(exc) == "goaway":
                tally.fail(f"connection error: {exc!r}")
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def slow_client(address: tuple[str, int], tally: Tally) -> None:
    try:
        conn = Conn(address)
        conn.sock.sendall(b'{"cmdid":1,"par')
        reply = conn.line()
        if reply is None or reply.get("code") != 408 or conn.line() is not None:
            tally.fail(f"slow client got {reply!r}")
        conn.close()
        tally.add("slow")
    except OSError as exc:
        tally.fail(f"slow client: {exc!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=20, help="concurrent client loops")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--request-timeout", type=float, default=2.0, help="server's slowloris limit")
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="percent allowed after warm-up")
    parser.add_argument("--max-fd-growth", type=int, default=16, help="fds allowed after warm-up")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args(argv)

    log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "geventtcp", "serve", "handlers", "-b", "127.0.0.1:0", "--workers",
         str(args.workers), "--request-timeout", str(args.request_timeout)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    print(f"server pid {proc.pid}, log {log.name}", flush=True)
    try:
        address = None
        deadline = time.monotonic() + 20
        while address is None and time.monotonic() < deadline and proc.poll() is None:
            with open(log.name) as fh:
                match = re.search(r"bound (\d+\.\d+\.\d+\.\d+):(\d+)", fh.read())
            if match:
                address = (match.group(1), int(match.group(2)))
            else:
                time.sleep(0.05)
        if address is None:
            print("soak: server did not start", file=sys.stderr)
            return 2
        wait_ready(address, args.workers)
        tally = Tally()
        started = time.monotonic()
        until = started + args.duration
        rng = random.Random(1)
        clients = [gevent.spawn(client_loop, address, until, tally, random.Random(rng.random()))
                   for _ in range(args.clients)]
        samples = []
        print(f"{'t(s)':>6} {'rss_kib':>9} {'fds':>5} {'procs':>5} {'good':>8} {'bad':>5} {'big':>5} {'slow':>5} "
              f"{'gone':>5} {'blank':>5} {'head':>5} {'pois':>5} {'fail':>5}", flush=True)
        while time.monotonic() < until:
            gevent.sleep(min(args.interval, max(0.0, until - time.monotonic())))
            rss, fds, procs = sample(proc.pid)
            t = time.monotonic() - started
            c = tally.counts
            samples.append({"t": round(t, 1), "rss_kib": rss, "fds": fds, "procs": procs})
            print(f"{t:6.1f} {rss:9d} {fds:5d} {procs:5d} {c.get('good', 0):8d} {c.get('malformed', 0):5d} "
                  f"{c.get('oversized', 0):5d} {c.get('slow', 0):5d} {c.get('disconnect', 0):5d} "
                  f"{c.get('blank', 0):5d} {c.get('blocked_head', 0):5d} {c.get('poisoned', 0):5d} "
                  f"{len(tally.failures):5d}", flush=True)
        gevent.joinall(clients, timeout=30)
        gevent.sleep(args.request_timeout + 1)  # let the last slow clients be closed
        rss, fds, procs = sample(proc.pid)
        samples.append({"t": round(time.monotonic() - started, 1), "rss_kib": rss, "fds": fds, "procs": procs})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    warm = [s for s in samples if s["t"] >= args.duration / 4] or samples
    base, peak = warm[0], max(s["rss_kib"] for s in warm)
    rss_growth = (peak - base["rss_kib"]) * 100.0 / base["rss_kib"]
    fd_growth = samples[-1]["fds"] - base["fds"]
    summary = {"duration_s": args.duration, "counts": tally.counts, "failures": len(tally.failures),
               "rss_after_warmup_kib": base["rss_kib"], "rss_peak_kib": peak, "rss_growth_pct": round(rss_growth, 2),
               "fds_after_warmup": base["fds"], "fds_at_end": samples[-1]["fds"], "fd_growth": fd_growth}
    for failure in tally.failures[:20]:
        print("FAIL:", failure, file=sys.stderr)
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    ok = not tally.failures and rss_growth <= args.max_rss_growth and fd_growth <= args.max_fd_growth
    if ok:
        os.unlink(log.name)  # kept (and named above) when the run failed
    return 0 if ok else 1


def wait_ready(address: tuple[str, int], workers: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            conn = Conn(address)
            reply = conn.call(b'{"cmdid":-3}')
            conn.close()
            if reply and reply.get("code") == 0 and len(reply["data"].get("workers", [None] * workers)) >= workers:
                return
        except OSError:
            pass
        gevent.sleep(0.1)
    raise SystemExit("soak: server not ready")


if __name__ == "__main__":
    sys.exit(main())
