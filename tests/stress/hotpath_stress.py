"""Stress of the server's per-request path: every request line gets exactly one reply, in order.

Many connections at once mix pipelined bursts, lines split into 1-byte writes or random chunks,
blocking handlers (some cut by a 504 deadline), half-closes and random disconnects (FIN or RST,
mid-line or with replies unread). Used by tests/test_connection.py (short run) and by hand::

    python -m tests.stress.hotpath_stress HOST PORT [CONNECTIONS] [SECONDS] [SEED]
"""

from __future__ import annotations

import json
import random
import socket as stdsocket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent import socket

from tests.support.rawconn import rst

__all__ = ["Totals", "run"]


@dataclass
class Totals:
    requests: int = 0  # request lines whose reply was awaited and checked
    replies: int = 0
    deadline_replies: int = 0
    bursts: int = 0
    byte_splits: int = 0
    half_closes: int = 0
    disconnects: int = 0
    connections: int = 0
    failures: list[str] = field(default_factory=list)


def _request(rng: random.Random, rid: str) -> tuple[bytes, Any]:
    """One request line and what its reply must be: ("echo", params) or ("code", code)."""
    roll = rng.random()
    if roll < 0.65:
        pad = "x" * rng.choice([0, 0, 10, 300, 3000, 70000 if rng.random() < 0.05 else 50])
        params = {"rid": rid, "pad": pad}
        return json.dumps({"cmdid": 1, "id": rid, "params": params}).encode() + b"\n", ("echo", params)
    if roll < 0.92:
        seconds = rng.choice([0, 0, 0.001, 0.005, 0.02, 0.05])
        line = {"cmdid": 2, "id": rid, "params": {"seconds": seconds}}
        return json.dumps(line).encode() + b"\n", ("sleep", seconds)
    if roll < 0.97:  # blocks past its deadline: a 504 that must still come in order
        line = {"cmdid": 2, "id": rid, "timeout_ms": 30, "params": {"seconds": 2}}
        return json.dumps(line).encode() + b"\n", ("code", 504)
    return b'{"cmdid": 1, "id": "' + rid.encode() + b'", "params": [1]}\n', ("code", 400)


def _check(reply: dict[str, Any], rid: str, expect: Any) -> str | None:
    if reply.get("id") != rid:
        return f"out of order or lost: expected id {rid}, got {reply!r:.200}"
    kind, value = expect
    if kind == "echo" and (reply.get("code") != 0 or reply.get("data") != value):
        return f"{rid}: bad echo reply {reply!r:.200}"
    if kind == "sleep" and (reply.get("code") != 0 or reply.get("data") != {"slept": value}):
        return f"{rid}: bad sleep reply {reply!r:.200}"
    if kind == "code" and reply.get("code") != value:
        return f"{rid}: expected code {value}, got {reply!r:.200}"
    return None


class _Lines:
    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError(f"EOF with {len(self.buf)} bytes of a line")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def at_eof(self) -> bool:
        while not self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return True
            self.buf += chunk
        return False


def _send(sock: Any, payload: bytes, mode: str, rng: random.Random) -> float:
    """Send ``payload`` as ``mode`` says; return when the last byte was sent (monotonic)."""
    if mode == "whole":
        sock.sendall(payload)
    elif mode == "bytes":
        for i in range(len(payload)):
            sock.sendall(payload[i:i + 1])
            if rng.random() < 0.2:
                gevent.sleep(0.001)  # let a segment go out alone (the server parks mid-line)
    else:
        pos = 0
        while pos < len(payload):
            step = rng.randint(1, 4096)
            sock.sendall(payload[pos:pos + step])
            pos += step
            if rng.random() < 0.3:
                gevent.sleep(0)
    return time.monotonic()


def _when(started: float, sender: Any) -> str:
    now = time.monotonic()
    if sender.successful():
        return f"burst sent in {sender.value - started:.2f}s, {now - sender.value:.2f}s ago"
    return f"burst still being sent after {now - started:.2f}s"


def _connect(address: tuple[str, int], timeout: float) -> Any:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    return sock


def _worker(n: int, address: tuple[str, int], deadline: float, seed: int, totals: Totals, timeout: float) -> None:
    rng = random.Random(seed * 100003 + n)
    seq = 0
    while time.monotonic() < deadline and not totals.failures:
        sock = _connect(address, timeout)
        totals.connections += 1
        lines = _Lines(sock)
        try:
            for _ in range(rng.randint(1, 30)):
                if time.monotonic() >= deadline:
                    break
                count = rng.choice([1, 1, 1, 2, 3, 8, 40, 150])
                reqs = []
                for _ in range(count):
                    seq += 1
                    reqs.append(_request(rng, f"{n}-{seq}"))
                payload = b"".join(line for line, _ in reqs)
                mode = rng.choice(["whole", "whole", "chunks", "bytes"]) if len(payload) < 600 else \
                    rng.choice(["whole", "chunks"])
                totals.bursts += 1
                totals.byte_splits += mode == "bytes"
                fate = rng.random()
                if fate < 0.03:  # disconnect mid-line, FIN or RST: nothing to check
                    cut = rng.randint(0, max(0, len(payload) - 1))
                    _send(sock, payload[:cut], "whole", rng)
                    (rst if rng.random() < 0.5 else type(sock).close)(sock)
                    totals.disconnects += 1
                    return_to_new = True
                elif fate < 0.06:  # send all, read some replies, then go away
                    sender = gevent.spawn(_send, sock, payload, mode, rng)
                    for _ in range(rng.randint(0, count - 1) if count > 1 else 0):
                        lines.line()
                    sender.kill()
                    (rst if rng.random() < 0.5 else type(sock).close)(sock)
                    totals.disconnects += 1
                    return_to_new = True
                else:
                    started = time.monotonic()
                    sender = gevent.spawn(_send, sock, payload, mode, rng)
                    half = fate < 0.12
                    if half:
                        sender.join()
                        sock.shutdown(stdsocket.SHUT_WR)
                    for rid_expect in reqs:
                        rid = json.loads(rid_expect[0])["id"]
                        try:
                            reply = json.loads(lines.line())
                        except (EOFError, OSError) as exc:
                            totals.failures.append(f"{rid}: no reply ({exc!r}; {_when(started, sender)})")
                            return
                        problem = _check(reply, rid, rid_expect[1])
                        if problem:
                            totals.failures.append(problem + f" (mode {mode}, half {half}; {_when(started, sender)})")
                            return
                        totals.replies += 1
                        totals.deadline_replies += reply.get("code") == 504
                    totals.requests += count
                    sender.join()
                    if sender.exception is not None:
                        totals.failures.append(f"send failed: {sender.exception!r}")
                        return
                    if half:
                        if not lines.at_eof():
                            totals.failures.append(f"after a half-close: {lines.buf[:200]!r} instead of EOF")
                            return
                        totals.half_closes += 1
                        sock.close()
                        return_to_new = True
                    else:
                        return_to_new = False
                if return_to_new:
                    break
        except (OSError, EOFError) as exc:
            totals.failures.append(f"worker {n}: {exc!r}")
        finally:
            sock.close()


def run(address: tuple[str, int], connections: int = 50, seconds: float = 4.0, seed: int = 1,
        timeout: float = 10.0) -> Totals:
    """Run ``connections`` workers for ``seconds``; ``totals.failures`` lists what went wrong."""
    totals = Totals()
    deadline = time.monotonic() + seconds
    workers = [gevent.spawn(_worker, n, address, deadline, seed, totals, timeout) for n in range(connections)]
    gevent.joinall(workers, timeout=seconds + 3 * timeout)
    for w in workers:
        if not w.dead:
            totals.failures.append("a worker did not finish (hang)")
            w.kill(block=False)
        elif w.exception is not None:
            totals.failures.append(f"worker crashed: {w.exception!r}")
    return totals


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    secs = float(sys.argv[4]) if len(sys.argv) > 4 else 20.0
    seed_arg = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    result = run((host, port), conns, secs, seed_arg)
    print({k: v for k, v in result.__dict__.items() if k != "failures"})
    for failure in result.failures[:20]:
        print("FAILURE:", failure)
    sys.exit(1 if result.failures else 0)
