"""The master's metrics endpoint: a minimal HTTP/1.0 responder serving the Prometheus text exposition.

It lives inside the master's ``select`` loop, which also reaps, replaces and signals the workers, so
it never blocks: every socket is non-blocking, each scrape keeps its own state (request bytes read,
response bytes left to send), and the loop watches those sockets along with the signal pipe (see
:meth:`geventtcp.launcher.signals.SignalQueue.wait`). A scrape has :data:`SCRAPE_TIMEOUT` seconds from its
accept to its last response byte, however its bytes trickle in or out; then it is closed. At most
:data:`MAX_SCRAPES` are open at once; more wait in the listen backlog.

Protected mode (on unless ``--no-protected-mode``) applies whatever the auth settings, since a token
guards the protocol, not scrapes: the launcher refuses a non-loopback ``metrics_bind``
(:func:`geventtcp.server.security.check_metrics_addresses`), and a non-loopback peer reaching a loopback
bind (port forwarding) is answered ``403 Forbidden`` and closed.
"""

from __future__ import annotations

import logging
import socket
import time

from geventtcp.launcher.metrics import prometheus_text, read_snapshots
from geventtcp.server.security import is_loopback
from geventtcp.sockets import create_listener, format_address

__all__ = ["MetricsEndpoint", "SCRAPE_TIMEOUT", "MAX_SCRAPES"]

log = logging.getLogger("geventtcp.arbiter")

#: Seconds a scraper has from its connect to the end of the response; the master waits for nobody.
SCRAPE_TIMEOUT = 5.0
#: Scrapes open at once; more wait in the listen backlog until one ends.
MAX_SCRAPES = 8
#: Request bytes read at most; the response is sent once the header ends, the peer half-closes, or this.
MAX_REQUEST_BYTES = 8192

_FORBIDDEN = (b"HTTP/1.0 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
              b"protected mode: only loopback scrapers are served (see --no-protected-mode)\n")


class _Scrape:
    """One scrape connection: the request read so far, then the response left to send."""

    __slots__ = ("sock", "peer", "deadline", "request", "response", "denied")

    def __init__(self, sock: socket.socket, peer: object, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.request = b""
        self.response: bytes | None = None  # set once the request is complete
        self.denied = False  # protected mode: answered 403 instead of the metrics


class MetricsEndpoint:
    """Answers ``GET /metrics`` (any path) with the merged stats of the workers' snapshot directory.

    :meth:`watch` says which descriptors to wait on and until when; :meth:`ready` does what their
    readiness allows, without blocking, and closes scrapes past their deadline.
    """

    def __init__(self, bind: str, stats_dir: str, protected: bool = True) -> None:
        listener = create_listener(bind, 64)
        self.sock = socket.socket(listener.family, listener.type, fileno=listener.detach())
        self.sock.setblocking(False)
        self.stats_dir = stats_dir
        self.protected = protected  # deny non-loopback scrapers
        self.scrapes: dict[int, _Scrape] = {}
        log.info("metrics on http://%s/metrics", format_address(self.sock))

    def address(self) -> object:
        """The bound address, as ``getsockname()`` gives it (for the protected-mode check)."""
        return self.sock.getsockname()

    def fds(self) -> list[int]:
        """Descriptors a forked worker should close (the open scrapes too: theirs to end, not a worker's)."""
        return [self.sock.fileno(), *self.scrapes]

    def watch(self) -> tuple[list[int], list[int], float | None]:
        """Descriptors to wait on for reading and for writing, and seconds until the next deadline."""
        readers = [fd for fd, s in self.scrapes.items() if s.response is None]
        writers = [fd for fd, s in self.scrapes.items() if s.response is not None]
        if len(self.scrapes) < MAX_SCRAPES:
            readers.append(self.sock.fileno())
        due = min((s.deadline for s in self.scrapes.values()), default=None)
        return readers, writers, None if due is None else max(0.0, due - time.monotonic())

    def ready(self, readable: list[int], writable: list[int]) -> None:
        """Accept, read and write what is ready; close what is done or overdue."""
        if self.sock.fileno() in readable:
            self._accept()
        for fd in readable:
            scrape = self.scrapes.get(fd)
            if scrape is not None and scrape.response is None:
                self._read(scrape)
        for fd in writable:
            scrape = self.scrapes.get(fd)
            if scrape is not None and scrape.response is not None:
                self._write(scrape)
        now = time.monotonic()
        for scrape in [s for s in self.scrapes.values() if s.deadline <= now]:
            log.debug("metrics scrape from %r: not done within %ss, closed", scrape.peer, SCRAPE_TIMEOUT)
            self._end(scrape)

    def _accept(self) -> None:
        try:
            conn, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. EMFILE: the next loop turn tries again
            log.debug("metrics accept failed: %s", exc)
            return
        conn.setblocking(False)
        scrape = _Scrape(conn, peer, time.monotonic() + SCRAPE_TIMEOUT)
        if self.protected and isinstance(peer, tuple) and not is_loopback(peer):
            # Answered 403 once its request is read: closing with it unread would reset the
            # connection, and the reset could discard the answer before the scraper reads it.
            log.warning("protected mode: denied non-loopback metrics scraper %r", peer[0])
            scrape.denied = True
        self.scrapes[conn.fileno()] = scrape

    def _read(self, scrape: _Scrape) -> None:
        try:
            chunk = scrape.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("metrics request failed: %s", exc)
            self._end(scrape)
            return
        scrape.request += chunk
        request = scrape.request
        if chunk and b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < MAX_REQUEST_BYTES:
            return
        scrape.response = _FORBIDDEN if scrape.denied else self._metrics_response()
        self._write(scrape)  # usually all of it fits in the socket buffer at once

    def _metrics_response(self) -> bytes:
        body = prometheus_text(read_snapshots(self.stats_dir)).encode()
        head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head + body

    def _write(self, scrape: _Scrape) -> None:
        assert scrape.response is not None, "written only once the request is complete"
        try:
            sent = scrape.sock.send(scrape.response)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("metrics response failed: %s", exc)
            self._end(scrape)
            return
        scrape.response = scrape.response[sent:]
        if not scrape.response:
            self._end(scrape)

    def _end(self, scrape: _Scrape) -> None:
        self.scrapes.pop(scrape.sock.fileno(), None)
        scrape.sock.close()

    def close(self) -> None:
        for scrape in list(self.scrapes.values()):
            self._end(scrape)
        self.sock.close()
