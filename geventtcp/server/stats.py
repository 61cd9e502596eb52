"""Per-command counters and latency histograms, cheap enough to stay on for every request."""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any

__all__ = ["Stats", "CommandStats"]

#: Histogram buckets are powers of two of a microsecond: bucket k holds durations < 2**k us.
_BUCKETS = 32
#: The bucket bounds in seconds: ``bisect_right`` over them finds a duration's bucket in one C call.
_BOUNDS = [2**k / 1e6 for k in range(_BUCKETS - 1)]


class CommandStats:
    """Counts for one cmdid; ``hist[k]`` counts calls that took under ``2**k`` microseconds."""

    __slots__ = ("count", "errors", "total", "hist")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total = 0.0
        self.hist = [0] * _BUCKETS

    def percentile(self, q: float) -> float:
        """Upper bound, in milliseconds, of the bucket holding the ``q`` quantile (0 when empty)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for k, n in enumerate(self.hist):
            seen += n
            if seen >= rank:
                return float(2**k) / 1000.0
        return float(2 ** (_BUCKETS - 1)) / 1000.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "errors": self.errors,
            "mean_ms": round(self.total / self.count * 1000.0, 3) if self.count else 0.0,
            "p50_ms": self.percentile(0.5),
            "p90_ms": self.percentile(0.9),
            "p99_ms": self.percentile(0.99),
        }


class Stats:
    """A worker's counters: per-command stats plus connection-level events."""

    def __init__(self) -> None:
        self.commands: dict[int, CommandStats] = {}
        self.protocol_errors = 0
        self.connections_total = 0
        self.connections_rejected = 0
        self.auth_failures = 0
        self.tls_failures = 0
        #: Connections closed on a proxy_protocol listener: untrusted peer, bad, late or missing header.
        self.proxy_header_failures = 0
        #: Connections closed for a request line not finished within request_timeout (slowloris).
        self.slow_request_disconnections = 0
        #: Connections dropped after write_timeout without write progress (a peer that reads nothing).
        self.write_timeout_disconnections = 0
        #: Requests for a cmdid with no handler (or one not allowed before AUTH). One counter, not an
        #: entry per cmdid: a peer sending endless distinct cmdids must not grow the worker's memory.
        self.unknown_commands = 0
        #: Blank lines received: ignored (no reply), but counted so that a flood of them is visible.
        self.blank_lines = 0

    def record(self, cmdid: int, code: int, seconds: float) -> None:
        """Count one answered request; ``seconds`` is how long its handler ran."""
        entry = self.commands.get(cmdid)
        if entry is None:
            entry = self.commands[cmdid] = CommandStats()
        entry.count += 1
        if code:
            entry.errors += 1
        entry.total += seconds
        entry.hist[bisect_right(_BOUNDS, seconds)] += 1  # the last bucket takes everything longer

    def as_dict(self) -> dict[str, Any]:
        return {
            "commands": {str(cmdid): s.as_dict() for cmdid, s in sorted(self.commands.items())},
            "protocol_errors": self.protocol_errors,
            "connections_total": self.connections_total,
            "connections_rejected": self.connections_rejected,
            "auth_failures": self.auth_failures,
            "tls_failures": self.tls_failures,
            "proxy_header_failures": self.proxy_header_failures,
            "slow_request_disconnections": self.slow_request_disconnections,
            "write_timeout_disconnections": self.write_timeout_disconnections,
            "unknown_commands": self.unknown_commands,
            "blank_lines": self.blank_lines,
        }
