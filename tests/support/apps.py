"""The test applications: the in-process server app (``make_registry``) and the launcher app's source
(``write_app``: a module file a launcher subprocess imports, and a HUP re-imports after a test rewrote it).

The client tests' app is ``tests.support.client_app`` (a module: its subprocess server imports it, and
its SLEEP echoes the params and its RECORD keeps an execution ledger, unlike the server app's).
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import gevent

from geventtcp.errors import Code, HandlerError
from geventtcp.urls import Registry

__all__ = ["make_registry", "APP_SOURCE", "write_app"]

#: What the fail handler raises: logged for the operator (with the control character escaped), never sent.
FAIL_DETAIL = "boom: secret traceback detail \x1b[31m"


def make_registry() -> Registry:
    """The server tests' handlers; gevent.sleep stands in for monkey-patched blocking calls.

    1 echo, 2 sleep, 3 fail (500), 4 unserializable, 5 refuse (NOT_FOUND, 1005), 6 spin (blocks the hub for
    params.seconds), 7 big, 8 introspect, 9 sleep_then_big, 20 bad_result (params.kind), 21 spin_forever
    (cooperative, until its deadline throws into it).
    """
    reg = Registry()
    reg.add(1, lambda req: req.params, name="echo", idempotent=True)
    reg.add(2, _sleep, name="sleep", idempotent=True)
    reg.add(3, _fail, name="fail")
    reg.add(4, lambda req: {1, 2}, name="unserializable")
    reg.add(5, _refuse, name="refuse")
    reg.add(6, _spin, name="spin")
    reg.add(7, lambda req: "x" * req.params.get("size", 0), name="big")
    reg.add(8, lambda req: {"id": req.id, "timestamp": req.timestamp, "raw": req.rawBody,
                            "address": list(req.address)}, name="introspect")
    reg.add(9, _sleep_then_big, name="sleep_then_big")
    reg.add(20, _bad_result, name="bad_result")
    reg.add(21, _spin_forever, name="spin_forever")
    return reg


def _sleep(req: Any) -> Any:
    gevent.sleep(float(req.params.get("seconds", 0)))
    return {"slept": req.params.get("seconds", 0)}


def _fail(req: Any) -> Any:
    raise RuntimeError(FAIL_DETAIL)


def _refuse(req: Any) -> Any:
    raise HandlerError("no such user", Code.NOT_FOUND)


def _spin(req: Any) -> Any:
    end = time.monotonic() + req.params.get("seconds", 0)
    while time.monotonic() < end:
        pass
    return "spun"


def _sleep_then_big(req: Any) -> Any:
    gevent.sleep(req.params.get("seconds", 0))
    return "x" * req.params.get("size", 0)


def _bad_result(req: Any) -> Any:
    """A result the codec refuses (params.kind: bigint, nan, set, circular) or a big one."""
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


def _spin_forever(req: Any) -> Any:
    while True:  # blocks cooperatively until the deadline throws into it
        gevent.sleep(0.01)


#: The test application: echo, sleep, CPU spin (blocks the hub), and whoami (the serving pid and
#: the module's VERSION, which a test rewrites to prove that HUP re-imports the application).
APP_SOURCE = textwrap.dedent('''
    import os
    import time

    from geventtcp import Registry

    VERSION = {version!r}
    registry = Registry()

    @registry.handler(1, idempotent=True)
    def echo(request):
        """Reply with the params."""
        return request.params

    @registry.handler(2, idempotent=True)
    def sleep(request):
        """Sleep params.seconds (patched time.sleep: cooperative)."""
        time.sleep(request.params.get("seconds", 0))
        return {{"slept": request.params.get("seconds", 0), "pid": os.getpid()}}

    @registry.handler(7)
    def spin(request):
        """Spin the CPU for params.seconds: blocks the event loop. While it spins, the file
        ``spinning-PID`` exists in the working directory, so a test knows the loop is blocked."""
        marker = "spinning-%d" % os.getpid()
        open(marker, "w").close()
        end = time.monotonic() + request.params.get("seconds", 0)
        while time.monotonic() < end:
            pass
        os.unlink(marker)
        return "spun"

    @registry.handler(9, idempotent=True)
    def whoami(request):
        """The serving worker's pid and the application version."""
        return {{"pid": os.getpid(), "version": VERSION}}
''')


def write_app(directory: Path, version: str = "v1", name: str = "opsapp") -> str:
    (directory / f"{name}.py").write_text(APP_SOURCE.format(version=version))
    return name


