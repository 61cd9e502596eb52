"""Load generator behind ``geventtcp bench``: closed-loop connections in several processes, latency histogram.

Each driver process opens its share of the connections with plain non-blocking sockets and one
``selectors`` loop (no gevent: the tool must not need the server's runtime), keeps ``pipeline``
requests in flight on each, and counts every reply line: one that does not start with
``{"code":0`` is an error, and only such a line is parsed, to count errors by code with the first
message of each. Requests cycle through the lines of :func:`request_lines` (one params object
each, plus ``meta``). Latencies go into a microsecond histogram, so a long run costs no memory
per request. Drivers report progress every ``PROGRESS_SECONDS`` and their totals at the end over a
pipe; the parent sums them. Who closes what: each driver closes its sockets; the parent joins the
drivers and kills any that outlive the run by ``JOIN_GRACE`` seconds.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import selectors
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BenchConfig", "BenchResult", "ErrorCount", "run", "request_line", "request_lines", "HISTOGRAM_US"]

#: Latencies up to this many microseconds are counted at 1 us resolution; longer ones in the last bucket.
HISTOGRAM_US = 1_000_000
PROGRESS_SECONDS = 0.5
JOIN_GRACE = 10.0
_OK_PREFIX = b'{"code":0'
#: Characters of an error reply's ``msg`` (or of a line that is not a reply) kept as its example.
MESSAGE_CHARS = 200


@dataclass
class BenchConfig:
    """What to run; ``requests`` (a total) wins over ``duration`` when set."""

    host: str
    port: int
    connections: int = 50
    pipeline: int = 1
    duration: float = 5.0
    requests: int = 0
    payload_size: int = 16
    cmdid: int = 1
    processes: int = 1
    warmup: float = 0.0
    #: Params objects sent in turn (cycled); None: ``{"data": "x" * payload_size}``.
    params: list[dict[str, Any]] | None = None
    #: Sent as the ``meta`` field of every request when set.
    meta: dict[str, Any] | None = None


@dataclass
class ErrorCount:
    """Error replies of one code (None: a line that is not a reply, or no reply before the connection closed)."""

    code: int | None
    count: int
    first_msg: str

    def as_dict(self) -> dict[str, Any]:
        from geventtcp.errors import Code

        try:
            name: str | None = Code(self.code).name if self.code is not None else None
        except ValueError:  # a code outside the table (another server's)
            name = None
        return {"code": self.code, "name": name, "count": self.count, "first_msg": self.first_msg}


@dataclass
class BenchResult:
    """Totals over every driver process."""

    completed: int = 0
    errors: int = 0
    seconds: float = 0.0
    hist: array = field(default_factory=lambda: array("q", bytes(8 * (HISTOGRAM_US + 1))))  # type: ignore[type-arg]
    failures: list[str] = field(default_factory=list)
    #: Error replies by code, most frequent first once :meth:`as_dict` sorted them.
    error_codes: dict[int | None, ErrorCount] = field(default_factory=dict)

    def add_errors(self, code: int | None, count: int, first_msg: str) -> None:
        row = self.error_codes.get(code)
        if row is None:
            self.error_codes[code] = ErrorCount(code, count, first_msg)
        else:
            row.count += count

    @property
    def rps(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Latency in milliseconds under which a fraction ``q`` of the measured replies (errors too) came."""
        total = sum(self.hist)
        if not total:
            return 0.0
        rank = max(1, math.ceil(q * total))
        seen = 0
        for us, n in enumerate(self.hist):
            seen += n
            if seen >= rank:
                return us / 1000.0
        return HISTOGRAM_US / 1000.0

    def extreme(self, last: bool) -> float:
        indices = range(len(self.hist) - 1, -1, -1) if last else range(len(self.hist))
        for us in indices:
            if self.hist[us]:
                return us / 1000.0
        return 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.completed,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "latency_ms": {
                "min": self.extreme(last=False), "p50": self.percentile(0.5), "p90": self.percentile(0.9),
                "p99": self.percentile(0.99), "p999": self.percentile(0.999), "max": self.extreme(last=True),
            },
            "failures": self.failures,
            "errors_by_code": [row.as_dict() for row in
                               sorted(self.error_codes.values(), key=lambda r: -r.count)],
        }


def request_line(cmdid: int, payload_size: int) -> bytes:
    """The default request: ``params.data`` holds ``payload_size`` bytes of text."""
    return b'{"cmdid":%d,"timestamp":0,"params":{"data":"%s"}}\n' % (cmdid, b"x" * payload_size)


def request_lines(cfg: BenchConfig) -> list[bytes]:
    """The request lines the connections send in turn: one per params object, each with ``meta`` if set."""
    if cfg.params is None and cfg.meta is None:
        return [request_line(cfg.cmdid, cfg.payload_size)]
    objects = cfg.params if cfg.params is not None else [{"data": "x" * cfg.payload_size}]
    lines = []
    for params in objects:
        request: dict[str, Any] = {"cmdid": cfg.cmdid, "timestamp": 0, "params": params}
        if cfg.meta is not None:
            request["meta"] = cfg.meta
        lines.append(json.dumps(request, separators=(",", ":")).encode() + b"\n")
    return lines


def _error_of(line: bytes) -> tuple[int | None, str]:
    """The code and message of an error reply line; (None, the line) when it is not a reply."""
    try:
        reply = json.loads(line)
        code = reply["code"]
        if isinstance(code, int) and not isinstance(code, bool):
            return code, str(reply.get("msg", ""))[:MESSAGE_CHARS]
    except (ValueError, TypeError, KeyError):
        pass
    return None, "not a reply: " + line[:MESSAGE_CHARS].decode("utf-8", "replace")


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class _Conn:
    __slots__ = ("sock", "sent", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent: deque[float] = deque()
        self.buf = b""


def _drive(cfg: BenchConfig, conns: int, quota: int, start_at: float, pipe: Any) -> None:
    """One driver process: run ``conns`` connections until the deadline or ``quota`` requests."""
    hist = array("q", bytes(8 * (HISTOGRAM_US + 1)))
    completed = errors = issued = 0
    failures: list[str] = []
    codes: dict[int | None, list[Any]] = {}  # code -> [count, first message]
    lines = request_lines(cfg)
    line = lines[0] if len(lines) == 1 else None  # one line: ``line * n``, no cycling
    turn = itertools.cycle(lines)

    def count_error(code: int | None, msg: str, n: int = 1) -> None:
        nonlocal errors
        errors += n
        row = codes.setdefault(code, [0, msg])
        row[0] += n
    sel = selectors.DefaultSelector()
    open_conns: list[_Conn] = []
    try:
        for _ in range(conns):
            sock = socket.create_connection((cfg.host, cfg.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = _Conn(sock)
            open_conns.append(conn)
            sel.register(sock, selectors.EVENT_READ, conn)
    except OSError as exc:
        failures.append(f"connect: {exc}")
    while time.time() < start_at:  # every driver starts together
        time.sleep(0.001)
    clock = time.perf_counter
    t0 = clock()
    measure_from = t0 + cfg.warmup
    deadline = measure_from + cfg.duration if not quota else math.inf
    next_report = t0 + PROGRESS_SECONDS
    measuring = cfg.warmup <= 0
    last = HISTOGRAM_US

    def send(conn: _Conn, n: int) -> None:
        nonlocal issued
        if quota:
            n = min(n, quota - issued)
        if n <= 0:
            return
        now = clock()
        conn.sent.extend([now] * n)
        issued += n
        data = line * n if line is not None else b"".join(next(turn) for _ in range(n))
        conn.sock.sendall(data)  # a few hundred bytes: the kernel takes it at once

    for conn in open_conns:
        try:
            send(conn, cfg.pipeline)
        except OSError as exc:
            failures.append(f"send: {exc}")
    live = len(open_conns)
    while live:
        now = clock()
        if now >= deadline or (quota and completed + errors >= quota):
            break
        if not measuring and now >= measure_from:
            measuring = True
            completed = errors = 0
            codes.clear()
            hist = array("q", bytes(8 * (HISTOGRAM_US + 1)))
        if now >= next_report:
            pipe.send(("progress", completed + errors))
            next_report = now + PROGRESS_SECONDS
        for key, _ in sel.select(timeout=0.05):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                data = b""
                failures.append(f"recv: {exc}")
            if not data:
                sel.unregister(conn.sock)
                conn.sock.close()
                if conn.sent:
                    count_error(None, "no reply: the server closed the connection", len(conn.sent))
                live -= 1
                if not failures:
                    failures.append("server closed a connection")
                continue
            buf = conn.buf + data
            done = buf.count(b"\n")
            if not done:
                conn.buf = buf
                continue
            at = clock()
            start = 0
            sent = conn.sent
            for _ in range(done):
                cut = buf.index(b"\n", start)
                if buf.startswith(_OK_PREFIX, start):
                    completed += 1
                else:
                    count_error(*_error_of(buf[start:cut]))
                us = int((at - sent.popleft()) * 1e6)
                hist[us if us < last else last] += 1
                start = cut + 1
            conn.buf = buf[start:]
            try:
                send(conn, done)
            except OSError as exc:
                failures.append(f"send: {exc}")
    elapsed = clock() - (measure_from if measuring else t0)
    for conn in open_conns:
        conn.sock.close()
    pipe.send(("done", completed, errors, elapsed, hist.tobytes(), failures[:5], codes))
    pipe.close()


def run(cfg: BenchConfig, on_progress: Callable[[float, int], None] | None = None) -> BenchResult:
    """Run the benchmark in ``cfg.processes`` driver processes; return the summed result.

    ``on_progress(seconds, replies)`` is called about every half second with running totals.
    Raises ``ValueError`` for an impossible configuration; connection failures are reported in
    ``BenchResult.failures`` (with the replies that never came counted as errors).
    """
    if cfg.connections < 1 or cfg.pipeline < 1 or cfg.processes < 1:
        raise ValueError("connections, pipeline and processes must be at least 1")
    processes = min(cfg.processes, cfg.connections)
    conns = _split(cfg.connections, processes)
    quotas = _split(cfg.requests, processes) if cfg.requests else [0] * processes
    if cfg.requests and min(quotas) == 0:
        processes = sum(1 for q in quotas if q)
        conns, quotas = conns[:processes], quotas[:processes]
    ctx: Any = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    start_at = time.time() + 0.2 + 0.002 * cfg.connections
    drivers = []
    for n, quota in zip(conns, quotas, strict=True):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_drive, args=(cfg, n, quota, start_at, child_end), daemon=True)
        proc.start()
        child_end.close()
        drivers.append((proc, parent_end))
    result = BenchResult()
    progress = [0] * len(drivers)
    finished: set[int] = set()
    limit = start_at + cfg.warmup + (cfg.duration if not cfg.requests else 3600.0) + JOIN_GRACE
    while len(finished) < len(drivers) and time.time() < limit:
        for i, (_, pipe) in enumerate(drivers):
            if i in finished:
                continue
            try:
                while pipe.poll(0.02):
                    msg = pipe.recv()
                    if msg[0] == "progress":
                        progress[i] = msg[1]
                    else:
                        _, completed, errors, seconds, hist_bytes, failures, codes = msg
                        result.completed += completed
                        result.errors += errors
                        result.seconds = max(result.seconds, seconds)
                        hist = array("q")
                        hist.frombytes(hist_bytes)
                        for us, n in enumerate(hist):
                            if n:
                                result.hist[us] += n
                        result.failures.extend(failures)
                        for code, (count, first_msg) in codes.items():
                            result.add_errors(code, count, first_msg)
                        finished.add(i)
                        break
            except (EOFError, OSError):
                result.failures.append("a driver process died")
                finished.add(i)
        if on_progress is not None:
            on_progress(max(0.0, time.time() - start_at), sum(progress))
    for proc, pipe in drivers:
        proc.join(timeout=1.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        pipe.close()
    return result
