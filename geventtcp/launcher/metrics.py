"""Stats across worker processes: per-worker snapshots in a shared directory, merged, and Prometheus text.

Each worker writes its snapshot (counters and latency histograms) to ``<dir>/<pid>.json`` about
once a second from its heartbeat greenlet, off the request path. The STATS built-in of any worker,
and the master's metrics endpoint, read every snapshot and merge them, so a single call sees the
whole server. The master deletes the file of a worker it reaps.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from geventtcp.server.blocking import running_requests
from geventtcp.server.stats import _BUCKETS, CommandStats

__all__ = ["snapshot", "write_snapshot", "read_snapshots", "merge", "prometheus_text", "LIMIT_COUNTERS"]

#: Counters of limit and security events (Stats attributes), summed over workers in STATS and exposed
#: as ``geventtcp_<name>_total``: each fatal path a client can trigger is visible (Redis's INFO does so).
LIMIT_COUNTERS: tuple[tuple[str, str], ...] = (
    ("auth_failures", "AUTH attempts with a wrong or missing token."),
    ("tls_failures", "TLS handshakes that failed or timed out."),
    ("proxy_header_failures", "Connections closed for an untrusted peer or a bad PROXY protocol header."),
    ("slow_request_disconnections", "Connections closed because a request line was not finished in time."),
    ("write_timeout_disconnections", "Connections dropped because the peer read nothing for write_timeout."),
    ("unknown_commands", "Requests for a cmdid with no handler (or not allowed before AUTH)."),
    ("blank_lines", "Blank request lines received (ignored; a connection sending only them is closed)."),
)


def snapshot(server: Any, **extra: Any) -> dict[str, Any]:
    """This process's counters, histograms included so that percentiles can be merged exactly."""
    stats = server.stats
    inflight: dict[int, int] = {}
    for req in running_requests(server):
        if req.cmdid >= 0:  # built-ins (such as the STATS call asking) are not application load
            inflight[req.cmdid] = inflight.get(req.cmdid, 0) + 1
    commands = {}
    for cmdid, entry in stats.commands.items():
        commands[str(cmdid)] = {"count": entry.count, "errors": entry.errors, "total_s": entry.total,
                                "hist": list(entry.hist), "inflight": inflight.pop(cmdid, 0)}
    for cmdid, n in inflight.items():
        commands[str(cmdid)] = {"count": 0, "errors": 0, "total_s": 0.0, "hist": [0] * _BUCKETS, "inflight": n}
    data = {
        "pid": os.getpid(),
        "time": time.time(),
        "uptime_s": round(time.time() - server.started_at, 3) if server.started_at else 0.0,
        "connections": len(server.connections),
        "connections_total": stats.connections_total,
        "connections_rejected": stats.connections_rejected,
        "protocol_errors": stats.protocol_errors,
        **{name: getattr(stats, name, 0) for name, _ in LIMIT_COUNTERS},
        "inflight": server.inflight,
        "draining": server.draining,
        "requests": sum(entry.count for entry in stats.commands.values()),
        "commands": commands,
    }
    data.update(extra)
    return data


def write_snapshot(directory: str, data: dict[str, Any]) -> None:
    """Atomically replace ``<directory>/<pid>.json`` (readers never see half a file)."""
    path = os.path.join(directory, f"{data['pid']}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def read_snapshots(directory: str) -> list[dict[str, Any]]:
    """Every worker's last snapshot; unreadable or vanishing files are skipped (a worker just exited)."""
    result = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                result.append(json.load(fh))
        except (OSError, ValueError):
            continue
    return result


#: Histogram buckets exposed to Prometheus: upper bounds 16 us .. 67 s (powers of two of a microsecond).
_EXPOSED_BUCKETS = range(4, 27)


def _merge_commands(snapshots: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for cmdid, c in snap.get("commands", {}).items():
            acc = merged.setdefault(cmdid, {"count": 0, "errors": 0, "total_s": 0.0, "hist": [0] * _BUCKETS,
                                            "inflight": 0})
            for key in ("count", "errors", "total_s", "inflight"):
                acc[key] += c.get(key, 0)
            acc["hist"] = [a + b for a, b in zip(acc["hist"], c["hist"], strict=False)]
    return merged


def _command_summary(count: int, errors: int, total: float, hist: list[int], inflight: int) -> dict[str, Any]:
    entry = CommandStats()
    entry.count, entry.errors, entry.total, entry.hist = count, errors, total, hist
    summary = entry.as_dict()
    summary["inflight"] = inflight
    return summary


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One STATS reply for the whole server: merged per-cmdid stats plus a row per worker."""
    workers = []
    totals = {"connections": 0, "connections_total": 0, "connections_rejected": 0, "protocol_errors": 0,
              "inflight": 0, **{name: 0 for name, _ in LIMIT_COUNTERS}}
    snapshots = list(snapshots)
    for snap in snapshots:
        workers.append({k: snap.get(k) for k in ("pid", "uptime_s", "connections", "connections_total",
                                                 "inflight", "draining", "generation", "requests")})
        for key in totals:
            totals[key] += int(snap.get(key) or 0)
    commands = _merge_commands(snapshots)
    merged: dict[str, Any] = {
        "commands": {cmdid: _command_summary(c["count"], c["errors"], c["total_s"], c["hist"], c["inflight"])
                     for cmdid, c in sorted(commands.items(), key=lambda kv: int(kv[0]))},
        "workers": sorted(workers, key=lambda w: w.get("pid") or 0),
    }
    merged.update(totals)
    return merged


def prometheus_text(snapshots: list[dict[str, Any]]) -> str:
    """The Prometheus text exposition (format 0.0.4) of the merged snapshots; needs no client library."""
    lines: list[str] = []

    def family(name: str, kind: str, doc: str) -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")

    order = sorted(_merge_commands(snapshots).items(), key=lambda kv: int(kv[0]))
    family("geventtcp_requests_total", "counter", "Requests answered, per cmdid.")
    lines += [f'geventtcp_requests_total{{cmdid="{k}"}} {c["count"]}' for k, c in order]
    family("geventtcp_request_errors_total", "counter", "Requests answered with a non-zero code, per cmdid.")
    lines += [f'geventtcp_request_errors_total{{cmdid="{k}"}} {c["errors"]}' for k, c in order]
    family("geventtcp_requests_in_flight", "gauge", "Requests whose handler is running, per cmdid.")
    lines += [f'geventtcp_requests_in_flight{{cmdid="{k}"}} {c["inflight"]}' for k, c in order]
    family("geventtcp_request_duration_seconds", "histogram", "Handler duration, per cmdid.")
    for k, c in order:
        for bucket in _EXPOSED_BUCKETS:  # a fixed set, so every scrape has the same series
            below = sum(c["hist"][: bucket + 1])
            lines.append(f'geventtcp_request_duration_seconds_bucket{{cmdid="{k}",le="{2**bucket / 1e6:g}"}} '
                         f"{below}")
        lines.append(f'geventtcp_request_duration_seconds_bucket{{cmdid="{k}",le="+Inf"}} {c["count"]}')
        lines.append(f'geventtcp_request_duration_seconds_sum{{cmdid="{k}"}} {c["total_s"]:.6f}')
        lines.append(f'geventtcp_request_duration_seconds_count{{cmdid="{k}"}} {c["count"]}')
    family("geventtcp_connections", "gauge", "Open connections, per worker.")
    lines += [f'geventtcp_connections{{pid="{s["pid"]}"}} {s.get("connections", 0)}' for s in snapshots]
    family("geventtcp_worker_uptime_seconds", "gauge", "Seconds since the worker started serving.")
    lines += [f'geventtcp_worker_uptime_seconds{{pid="{s["pid"]}"}} {s.get("uptime_s", 0)}' for s in snapshots]
    family("geventtcp_connections_rejected_total", "counter", "Connections refused over max_connections.")
    lines.append(f"geventtcp_connections_rejected_total {sum(s.get('connections_rejected', 0) for s in snapshots)}")
    family("geventtcp_protocol_errors_total", "counter", "Request lines that were not valid requests.")
    lines.append(f"geventtcp_protocol_errors_total {sum(s.get('protocol_errors', 0) for s in snapshots)}")
    for name, doc in LIMIT_COUNTERS:
        family(f"geventtcp_{name}_total", "counter", doc)
        lines.append(f"geventtcp_{name}_total {sum(s.get(name, 0) for s in snapshots)}")
    family("geventtcp_workers", "gauge", "Worker processes that reported stats.")
    lines.append(f"geventtcp_workers {len(snapshots)}")
    return "\n".join(lines) + "\n"
