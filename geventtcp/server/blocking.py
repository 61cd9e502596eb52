"""Event-loop blocking detector: a watcher thread notices a stuck hub and names the running request.

A handler that spins the CPU or makes an unpatched blocking call freezes every connection of its
worker. The hub refreshes a heartbeat from a timer every quarter of ``blocking_time``; a plain OS
thread checks it at the same pace, and when the heartbeat is older than ``blocking_time`` plus one
tick (so the loop has been stuck for at least ``blocking_time``) it logs a warning on
``geventtcp.blocking`` with the cmdid, id and peer of the request that was running, found by walking
the hub thread's stack to the connection's dispatch frame at that moment, and where the hub thread
was: the module, file:line, function and source line of its innermost Python frame. A C function
(a C database driver's ``execute``) has no frame of its own, so a stall inside one is placed at the
Python line that called it, which names the call.

:func:`uncooperative_drivers` is the start-up half of the same job: a worker calls
:func:`warn_uncooperative_drivers` once the application is imported, and each database driver it
finds imported that is known to block the event loop (psycopg2 without a wait callback, mysqlclient)
is logged with what to do instead. It reads ``sys.modules`` only, so it imports nothing.

One stall can span several requests: lines read together are dispatched back to back without a
hub turn. The watcher keeps sampling the stack while the stall lasts, and a request that starts
inside it and itself holds the loop ``blocking_time`` gets its own warning; so the handler that
caused most of a stall is named even when another one was running when the stall was noticed.

Why not gevent's own monitor thread: its ``EventLoopBlocked`` event comes only after it has formatted
every thread and greenlet (``gc.get_objects()``), which under GIL contention with the spinning handler
can outlast the spin, so the stack would no longer name the request. Its greenlet-switch tracer also
costs on every switch; the heartbeat timer costs four callbacks per ``blocking_time``.
"""

from __future__ import annotations

import linecache
import logging
import sys
import traceback
from time import perf_counter
from types import FrameType
from typing import Any

from geventtcp.protocol import Request
from geventtcp.server.connection import Connection

__all__ = ["BlockingDetector", "enable_blocking_detector", "request_in_stack", "running_requests", "where",
           "uncooperative_drivers", "warn_uncooperative_drivers"]

log = logging.getLogger("geventtcp.blocking")

#: The code of the function whose ``req`` local is the request a handler serves: compared by
#: identity, so an application's own ``_dispatch`` (in its own ``connection.py``) is never taken for it.
_DISPATCH_CODE = Connection._dispatch.__code__


def request_in_stack(frame: FrameType | None) -> Request | None:
    """The request whose handler runs in the stack ending at ``frame`` (innermost dispatch), or ``None``."""
    while frame is not None:
        if frame.f_code is _DISPATCH_CODE:
            req = frame.f_locals.get("req")
            if isinstance(req, Request):
                return req
        frame = frame.f_back
    return None


def running_requests(server: Any) -> list[Request]:
    """Requests whose handlers are running or parked on ``server`` right now (for STATS in-flight).

    Handed-off handlers are suspended greenlets, whose stacks can be read; the one inline request
    running in the caller's greenlet (``conn.running``) is included too.
    """
    found: list[Request] = []
    for conn in list(server.connections):
        if conn.running is not None:
            found.append(conn.running)
        for glet in list(conn.handlers):
            req = request_in_stack(getattr(glet, "gr_frame", None))
            if req is not None:
                found.append(req)
    return found


def _describe(req: Request | None) -> str:
    if req is None:
        return "no running request (outside any handler, or it returned before it could be named)"
    peer = req.address
    if isinstance(peer, tuple):
        peer = f"{peer[0]}:{peer[1]}"
    return f"cmdid {req.cmdid} (id {req.id!r}, peer {peer})"


def where(frame: FrameType | None) -> str:
    """Where ``frame`` is: ``module (file:line, in function: source line)``; the report's location."""
    if frame is None:
        return "an unknown place (no Python frame)"
    code = frame.f_code
    line = frame.f_lineno or 0
    source = linecache.getline(code.co_filename, line).strip()
    module = frame.f_globals.get("__name__", "?")
    return f"{module} ({code.co_filename}:{line}, in {code.co_name}{': ' + source if source else ''})"


class BlockingDetector:
    """The heartbeat timer on the hub and the watcher thread that reads it; one per serving process.

    The watcher is a daemon thread of the unpatched ``_thread`` module, so it runs while the hub
    is stuck; it only reads the heartbeat and the hub thread's frames, and logs. ``stop()`` ends both.
    """

    def __init__(self, threshold: float) -> None:
        from gevent.hub import get_hub
        from gevent.monkey import get_original

        self.threshold = threshold
        self.tick = threshold / 4
        self.stalls = 0  # warnings logged (one per stall, plus one per further request holding it)
        self.running = True
        self.beat = perf_counter()
        # The OS id of this (the hub's) thread: threading's own ident is patched to a greenlet's.
        self._hub_thread: int = get_original("_thread", "get_ident")()
        self._sleep = get_original("time", "sleep")
        self._timer = get_hub().loop.timer(self.tick, self.tick, ref=False)  # never keeps the loop alive
        self._timer.start(self._beat)
        get_original("_thread", "start_new_thread")(self._watch, ())

    def _beat(self) -> None:
        self.beat = perf_counter()

    def _watch(self) -> None:
        # The last beat is at most one tick old while the loop turns, so an age beyond
        # threshold + tick means the loop has been stuck for more than ``threshold``.
        limit = self.threshold + self.tick
        stalled = False
        named: Request | None = None  # the request the last warning of this stall named
        seen: Request | None = None  # the request running at the last sample, and since when
        seen_at = 0.0
        while self.running:
            self._sleep(self.tick)
            now = perf_counter()
            if now - self.beat <= limit:
                stalled = False
                named = seen = None
                continue
            if not self.running:
                return
            frame = sys._current_frames().get(self._hub_thread)
            req = request_in_stack(frame)  # first: the handler may return any moment
            if req is not seen:
                seen, seen_at = req, now
            # The stall's first warning names whatever runs now; a later request in the same stall
            # is named once it has held the loop ``threshold`` by itself.
            if not stalled or (req is not None and req is not named and now - seen_at >= self.threshold):
                stalled = True
                named = req
                self._report(req, frame)
                self.stalls += 1  # after the report: a waiter on ``stalls`` finds it logged

    def _report(self, req: Request | None, frame: FrameType | None) -> None:
        log.warning("event loop blocked for more than %.3gs by %s in %s", self.threshold, _describe(req), where(frame))
        if frame is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("blocked stack:\n%s", "".join(traceback.format_stack(frame)))

    def stop(self) -> None:
        self.running = False
        self._timer.close()


_detector: BlockingDetector | None = None


def enable_blocking_detector(max_blocking_time: float) -> BlockingDetector | None:
    """Start this process's detector (``None`` if ``max_blocking_time`` is 0); call it in the hub's thread.

    Call it in each process that serves, after fork (threads do not survive ``fork``). A second call
    replaces the first detector.
    """
    global _detector
    if _detector is not None:
        _detector.stop()
        _detector = None
    if max_blocking_time:
        _detector = BlockingDetector(max_blocking_time)
    return _detector


#: The guide that says what to do about each of these (a page of the documentation site).
_GUIDE = "see 'Making your libraries cooperative' in the geventtcp docs (cooperative.md)"


def uncooperative_drivers() -> list[str]:
    """A warning for each imported database driver that blocks the event loop, saying what to do instead.

    psycopg2 is a C extension with its own socket: gevent cannot patch it, so unless a wait callback
    is installed (``psycogreen.gevent.patch_psycopg()``), every query holds the whole worker.
    mysqlclient (``MySQLdb``) is the same and has no hook at all.
    """
    found: list[str] = []
    extensions = sys.modules.get("psycopg2.extensions")
    if extensions is not None and extensions.get_wait_callback() is None:
        found.append("psycopg2 is imported without a wait callback: each query blocks this worker's event loop "
                     "(every other request waits for it). Call psycogreen.gevent.patch_psycopg() before the "
                     f"first connection, or use psycopg 3; {_GUIDE}")
    if "MySQLdb" in sys.modules:
        found.append("MySQLdb (mysqlclient) is imported: a C driver gevent cannot make cooperative, so each query "
                     f"blocks this worker's event loop. Use PyMySQL; {_GUIDE}")
    return found


def warn_uncooperative_drivers() -> None:
    """Log :func:`uncooperative_drivers` on ``geventtcp.blocking`` (a worker calls it once the app is imported)."""
    for message in uncooperative_drivers():
        log.warning("%s", message)
