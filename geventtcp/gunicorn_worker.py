"""gunicorn integration: ``gunicorn -k geventtcp.gunicorn_worker.GeventTCPWorker APP`` serves APP's handlers.

For teams that already run gunicorn (needs the ``geventtcp[gunicorn]`` extra). gunicorn's master
binds, forks, supervises and handles signals as usual; each worker is gunicorn's gevent worker
(monkey-patched after fork, heartbeat through ``notify()``) whose ``run()`` serves the inherited
listeners with a :class:`geventtcp.Server` instead of HTTP. ``APP`` is what ``geventtcp serve``
takes (``module`` or ``module:attr``), not a WSGI application.

Settings: gunicorn's ``graceful_timeout``, ``worker_connections`` (as ``max_connections``) and
``max_requests``/``max_requests_jitter`` apply; every other geventtcp setting comes from its
``GEVENTTCP_*`` environment variable. On TERM (and on HUP, which gunicorn turns into TERM for the
old workers) the worker drains as the geventtcp launcher does: requests already read are answered,
idle connections get the goaway line, the rest are stopped after ``graceful_timeout``.
"""

from __future__ import annotations

from typing import Any

import gevent
from gevent.event import Event
from gunicorn.workers.ggevent import GeventWorker

from geventtcp.config import Config, load
from geventtcp.server.blocking import enable_blocking_detector, warn_uncooperative_drivers
from geventtcp.server.server import Server
from geventtcp.urls import Registry, load_registry

__all__ = ["GeventTCPWorker"]


class GeventTCPWorker(GeventWorker):  # type: ignore[misc]
    """A gunicorn gevent worker speaking geventtcp's protocol on every listener."""

    registry: Registry
    server: Server
    alive: bool  # gunicorn's: False once the worker should stop
    nr: int  # gunicorn's: requests served
    max_requests: int  # gunicorn's: the limit with its jitter, 0 for none

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = Event()

    def load_wsgi(self) -> None:
        """Load the handlers instead of a WSGI callable; an import error is a gunicorn boot error."""
        self.registry = load_registry(self.app.app_uri)
        self.wsgi = None

    def geventtcp_config(self) -> Config:
        """geventtcp settings: ``GEVENTTCP_*`` environment variables, then gunicorn's own equivalents."""
        config = load()
        config.set("graceful_timeout", self.cfg.graceful_timeout, "gunicorn graceful_timeout")
        config.set("max_connections", self.cfg.worker_connections, "gunicorn worker_connections")
        return config

    def run(self) -> None:
        server = Server(self.registry, config=self.geventtcp_config(), listeners=self.sockets)
        if self.cfg.workers > 1:
            server.max_accept = 1  # as gunicorn's gevent worker does for a shared listener
        if self.max_requests:
            server.access_log = self._count_request
        self.server = server
        server.start()
        enable_blocking_detector(server.settings.blocking_time)
        warn_uncooperative_drivers()
        self.log.info("geventtcp serving %s (pid %d)", ", ".join(server.addresses), self.pid)
        while self.alive:
            self.notify()
            self._wake.wait(1.0)
        heartbeat = gevent.spawn(self._heartbeat)  # draining may take up to graceful_timeout
        try:
            server.stop(timeout=self.cfg.graceful_timeout, reason=server.drain_reason)
        finally:
            heartbeat.kill(block=False)

    def _heartbeat(self) -> None:
        while True:
            self.notify()
            gevent.sleep(1.0)

    def _count_request(self, conn: Any, req: Any, code: int, seconds: float) -> None:
        """Server.access_log hook: gunicorn's ``max_requests`` (``self.nr``, jitter already applied)."""
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
            # Drain from now on (not at the next heartbeat): readers goaway instead of reading on.
            self.server.begin_drain("max_requests")
            self._wake.set()
