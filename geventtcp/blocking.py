"""Event-loop blocking detector: gevent's monitor thread reports a stuck hub, we name the request.

A handler that spins the CPU or makes an unpatched blocking call freezes every connection of its
worker. gevent's periodic monitoring thread notices that no greenlet switch happened for
``max_blocking_time`` seconds and emits :class:`gevent.events.EventLoopBlocked`; the subscriber here
logs one warning on ``geventtcp.blocking`` with the cmdid, id and peer of the request that was
running, found by walking the blocked thread's stack to the connection's dispatch frame. Nothing is
added to the request path: the lookup runs only when a block is reported.
"""

from __future__ import annotations

import logging
import sys
import warnings
from types import FrameType
from typing import Any

from .protocol import Request

__all__ = ["enable_blocking_detector", "request_in_stack", "running_requests"]

log = logging.getLogger("geventtcp.blocking")

#: The function of geventtcp.connection whose ``req`` local is the request a handler serves.
_DISPATCH_CODE_NAME = "_dispatch"
_DISPATCH_FILE = "connection.py"


def request_in_stack(frame: FrameType | None) -> Request | None:
    """The request whose handler runs in the stack ending at ``frame`` (innermost dispatch), or ``None``."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == _DISPATCH_CODE_NAME and code.co_filename.endswith(_DISPATCH_FILE):
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


def enable_blocking_detector(max_blocking_time: float) -> bool:
    """Start gevent's monitor thread for this process's hub and log blocks; False if ``max_blocking_time`` is 0.

    Call it in each process that serves (after fork: threads do not survive ``fork``). gevent's own
    report printing is turned off in favour of the log line; the stack is logged at debug level.
    """
    if not max_blocking_time:
        return False
    import gevent
    from gevent import events
    from gevent.hub import get_hub
    from gevent.monkey import get_original

    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = max_blocking_time
    gevent.config.print_blocking_reports = False
    # The OS id of this (the hub's) thread: threading's own ident is patched to a greenlet's.
    hub_thread = get_original("_thread", "get_ident")()

    def on_event(event: Any) -> None:
        if not isinstance(event, events.EventLoopBlocked):
            return
        frame = sys._current_frames().get(hub_thread)
        req = request_in_stack(frame)
        log.warning("event loop blocked for more than %.3gs by %s", event.blocking_time, _describe(req))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("blocked stack:\n%s", "\n".join(str(line) for line in event.info))

    if on_event not in events.subscribers:
        events.subscribers.append(on_event)
    with warnings.catch_warnings():  # "install psutil": memory monitoring is not asked for here
        warnings.simplefilter("ignore")
        get_hub().start_periodic_monitoring_thread()
    return True
