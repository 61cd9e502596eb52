"""A test application for the client tests: cooperative sleep (no monkey-patching needed) and an
execution ledger that shows whether a non-idempotent command ran twice."""

import os
from typing import Any

import gevent

from geventtcp import DependencyUnavailable, Registry, Request

registry = Registry()

ECHO, SLEEP, FAIL, RECORD, PID, UNAVAILABLE, META = 1, 2, 3, 4, 5, 6, 7
#: In-process record of RECORD executions (tag per run); a subprocess server appends to $LEDGER.
executed: list[str] = []


@registry.handler(ECHO, idempotent=True)
def echo(request: Request) -> Any:
    """Reply with the params."""
    return request.params


@registry.handler(SLEEP, idempotent=True)
def sleep(request: Request) -> Any:
    """gevent.sleep(params.seconds), then reply with the params."""
    gevent.sleep(float(request.params.get("seconds", 0)))
    return request.params


@registry.handler(FAIL)
def fail(request: Request) -> Any:
    """Always a 500."""
    raise RuntimeError("always fails")


@registry.handler(RECORD)
def record(request: Request) -> Any:
    """Not idempotent: log params.tag (in memory, and to $LEDGER when set), optionally sleep first."""
    seconds = float(request.params.get("seconds", 0))
    if seconds:
        gevent.sleep(seconds)
    tag = str(request.params.get("tag"))
    executed.append(tag)
    ledger = os.environ.get("LEDGER")
    if ledger:
        with open(ledger, "a") as fh:
            fh.write(tag + "\n")
    return {"tag": tag, "pid": os.getpid()}


@registry.handler(PID, idempotent=True)
def pid(request: Request) -> Any:
    """Which process answered."""
    return os.getpid()


@registry.handler(UNAVAILABLE)
def unavailable(request: Request) -> Any:
    """DependencyUnavailable (the handler ran; never resent by the client) until params.after calls
    were seen for params.key (a handler cannot answer 503, which only the server may send)."""
    key = str(request.params.get("key"))
    seen = _seen[key] = _seen.get(key, 0) + 1
    if seen <= int(request.params.get("after", 1)):
        raise DependencyUnavailable("try again", details={"seen": seen})
    return seen


_seen: dict[str, int] = {}


@registry.handler(META, idempotent=True)
def meta(request: Request) -> Any:
    """Reply with the request's meta."""
    return dict(request.meta)
