"""Reader greenlets shared by connections, so that an idle connection holds no greenlet.

A greenlet parked in ``recv`` keeps its saved C stack and frames: about 6.6 KB per idle connection,
more than everything else a connection holds. Instead, a connection whose ``recv`` would block
*parks*: it starts its socket's read watcher with a callback and lets its greenlet go. When the peer
sends, the callback (in the hub) hands the connection to a free reader greenlet, or to a new one,
and switches into it at once: about what gevent's own ``recv`` pays to resume a waiting greenlet.

Free greenlets wait in a bounded list (``keep``) instead of ending, because a new greenlet costs an
``mmap`` and ``munmap`` of its Python frame stack: a greenlet per resume halved the 50x1 throughput.
Reuse is scoped like a thread pool's: each run starts in an empty ``contextvars`` context, but
greenlet-local data (``gevent.local``, a patched ``threading.local``) may be seen by a later request
that runs in the same greenlet, as with thread-locals under gunicorn's threads. Handlers run in
plain ``greenlet`` objects: ``gevent.getcurrent()`` is not always a :class:`gevent.Greenlet`.

Failure behaviour: an exception that escapes a connection's run is logged and aborts that
connection (``GreenletExit``, a kill by ``Server.close``, silently, if it is not closed already);
it ends that greenlet and never reaches the hub.
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
        """Hub-side: start ``target(*args)`` in a free greenlet now, in an empty contextvars context."""
        free = self.free
        if free:
            glet = free.pop()
            glet.gr_context = None  # the last run's contextvars stay behind
        else:
            glet = self._new()
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
                _abort_unless_closed(target)
                return
            except BaseException:  # a bug in the read loop: this connection ends, the hub lives on
                log.exception("reader greenlet failed")
                _abort_unless_closed(target)
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


def _abort_unless_closed(target: Callable[..., Any]) -> None:
    connection = getattr(target, "__self__", None)
    if connection is not None and not getattr(connection, "closed", True):
        connection.abort()
