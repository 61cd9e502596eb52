"""Shared helpers of the reliability tests: an in-process server and its test handlers, process probes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import gevent

from geventtcp.errors import HandlerError
from geventtcp.server.server import Server
from geventtcp.urls import Registry

__all__ = ["serve", "make_registry", "rss_kib", "open_fds"]


def make_registry() -> Registry:
    """Handlers the hostile-input and limit tests need (cmdids mirror the example app where they overlap)."""
    reg = Registry()

    def echo(req: Any) -> Any:
        return req.params

    def sleep(req: Any) -> Any:
        gevent.sleep(float(req.params.get("seconds", 0)))
        return {"slept": req.params.get("seconds", 0)}

    def fail(req: Any) -> Any:
        raise RuntimeError("secret internal detail \x1b[31m")

    def bad_result(req: Any) -> Any:
        kind = req.params.get("kind")
        if kind == "bigint":
            return 10**5000
        if kind == "nan":
            return float("nan")
        if kind == "set":
            return {1, 2}
        if kind == "circular":
            loop: list[Any] = []
            loop.append(loop)
            return loop
        if kind == "big":
            return "x" * int(req.params.get("size", 0))
        raise HandlerError("unknown kind")

    def spin(req: Any) -> Any:
        # Blocks cooperatively forever (until the deadline throws into it).
        while True:
            gevent.sleep(0.01)

    reg.add(1, echo, idempotent=True)
    reg.add(2, sleep, idempotent=True)
    reg.add(3, fail)
    reg.add(20, bad_result)
    reg.add(21, spin)
    return reg


@contextlib.contextmanager
def serve(registry: Registry | None = None, **settings: Any) -> Iterator[Server]:
    """Run a Server on 127.0.0.1 port 0 in this process's hub; closed (not drained) on exit."""
    settings.setdefault("bind", "127.0.0.1:0")
    server = Server(registry if registry is not None else make_registry(), **settings)
    server.start()
    try:
        yield server
    finally:
        server.close()


def rss_kib(pid: int | None = None) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid or os.getpid()}/status") as fh:
        for row in fh:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int | None = None) -> int:
    """Number of open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
