"""The master's metrics endpoint: a minimal HTTP/1.0 responder serving the Prometheus text exposition."""

from __future__ import annotations

import logging
import socket

from .metrics import prometheus_text, read_snapshots
from .sockets import create_listener, format_address

__all__ = ["MetricsEndpoint"]

log = logging.getLogger("geventtcp.arbiter")

#: A scraper gets this long to send its request line; the master's loop waits for nobody longer.
READ_TIMEOUT = 1.0


class MetricsEndpoint:
    """Answers ``GET /metrics`` (any path) with the merged stats of the workers' snapshot directory.

    It runs inside the master's ``select`` loop, one request per readable event, so it has no
    thread and no hub; a slow scraper holds the loop at most :data:`READ_TIMEOUT` seconds.
    """

    def __init__(self, bind: str, stats_dir: str) -> None:
        listener = create_listener(bind, 64)
        self.sock = socket.socket(listener.family, listener.type, fileno=listener.detach())
        self.sock.setblocking(False)
        self.stats_dir = stats_dir
        log.info("metrics on http://%s/metrics", format_address(self.sock))

    def fileno(self) -> int:
        return self.sock.fileno()

    def fds(self) -> list[int]:
        """Descriptors a forked worker should close."""
        return [self.sock.fileno()]

    def serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            try:
                conn.settimeout(READ_TIMEOUT)
                request = b""
                while b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < 8192:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                body = prometheus_text(read_snapshots(self.stats_dir)).encode()
                head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                conn.sendall(head + body)
            except OSError as exc:
                log.debug("metrics request failed: %s", exc)

    def close(self) -> None:
        self.sock.close()
