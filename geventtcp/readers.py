"""Reader greenlets shared by connections, so that an idle connection holds no greenlet.

A greenlet parked in ``recv`` keeps its saved C stack and frames: about 6.6 KB per idle connection,
more than everything else a connection holds. Instead, a connection whose ``recv`` would block
*parks*: it starts its socket's read watcher with a callback and lets its greenlet go. When the peer
sends, the callback (in the hub) hands the connection to a free reader greenlet, or to a new one.
Free greenlets wait in a bounded list, so a burst leaves at most ``keep`` of them behind.

The switch into a free greenlet replaces the switch gevent's own ``recv`` makes to resume the
waiting greenlet: the cost per request is the same, only the greenlet is not the connection's.

Failure behaviour: an exception that escapes a connection's run ends that greenlet (it is logged,
the connection is aborted) and never reaches the hub; ``GreenletExit`` (a kill) ends it silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gevent import get_hub
from greenlet import GreenletExit, getcurrent, greenlet

__all__ = ["ReaderPool"]

log = logging.getLogger("geventtcp.server")


class ReaderPool:
    """Runs ``target(*args)`` (a connection's read loop) in a free greenlet of the calling thread's hub.

    ``run`` must be called from the hub (an io watcher callback or ``loop.run_callback``): it
    switches into the chosen greenlet, which switches back to the hub when it next waits.
    """

    def __init__(self, keep: int = 128) -> None:
        self.keep = keep
        self.free: list[greenlet] = []
        self.created = 0

    def run(self, target: Callable[..., Any], *args: Any) -> None:
        """Hub-side: start ``target(*args)`` in a free greenlet now."""
        free = self.free
        glet = free.pop() if free else self._new()
        glet.switch(target, args)

    def _new(self) -> greenlet:
        self.created += 1
        return greenlet(self._main, parent=get_hub())

    def _main(self, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        free = self.free
        me = getcurrent()
        hub = me.parent
        while True:
            try:
                target(*args)
            except GreenletExit:
                return
            except BaseException:  # a bug in the read loop: this greenlet ends, the hub lives on
                log.exception("reader greenlet failed")
                connection = getattr(target, "__self__", None)
                if connection is not None:
                    connection.abort()
                return
            del target, args  # a free greenlet must not keep the last connection alive
            if len(free) >= self.keep:
                return
            free.append(me)
            try:
                target, args = hub.switch()
            except BaseException:  # a stray throw into a free greenlet (a leaked Timeout): leave
                if me in free:
                    free.remove(me)
                return
