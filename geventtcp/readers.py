"""Reader greenlets started from the hub, so that an idle connection holds no greenlet.

A greenlet parked in ``recv`` keeps its saved C stack and frames: about 6.6 KB per idle connection,
more than everything else a connection holds. Instead, a connection whose ``recv`` would block
*parks*: it starts its socket's read watcher with a callback and lets its greenlet end. When the
peer sends, the callback (in the hub) starts a new raw greenlet for the connection and switches
into it at once, which costs about what gevent's own ``recv`` pays to resume a waiting greenlet
(callgrind: +250 instructions per request over reusing pooled greenlets, against +2,400 for
``gevent.spawn``).

A new greenlet per resume, not a pool: a handler's greenlet-local state (``gevent.local``, a
patched ``threading.local``), its ``contextvars`` and any timer it leaked die with the greenlet
and can never reach another client's request. Handlers therefore run in plain ``greenlet``
objects: ``gevent.getcurrent()`` is not always a :class:`gevent.Greenlet` with ``name``/``link``.

Failure behaviour: an exception that escapes a connection's run is logged and aborts that
connection; it never reaches the hub. ``GreenletExit`` (a kill by ``Server.close``) is silent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gevent import get_hub
from greenlet import GreenletExit, greenlet

__all__ = ["start_reader"]

log = logging.getLogger("geventtcp.server")


def start_reader(target: Callable[..., Any], *args: Any) -> None:
    """Hub-side (an io watcher or ``loop.run_callback`` callback): run ``target(*args)`` in a new
    greenlet now; it switches back to the hub whenever it waits, and ends when ``target`` returns."""
    greenlet(_run, parent=get_hub()).switch(target, args)


def _run(target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        target(*args)
    except GreenletExit:
        _abort_unless_closed(target)  # a kill by Server.close finds its connection closed already
    except BaseException:  # a bug in the read loop: this connection ends, the hub lives on
        log.exception("reader greenlet failed")
        _abort_unless_closed(target)


def _abort_unless_closed(target: Callable[..., Any]) -> None:
    connection = getattr(target, "__self__", None)
    if connection is not None and not getattr(connection, "closed", True):
        connection.abort()
