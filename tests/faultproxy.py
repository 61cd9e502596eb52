"""A toxiproxy-like TCP proxy on gevent for tests: latency, slicing, reset, black hole, cut mid-reply.

Toxics are plain attributes, read for every chunk, so a test can turn them on and off while
connections are open. ``upstream`` is client-to-server, ``downstream`` server-to-client.
"""

from __future__ import annotations

import socket as stdsocket
import struct
from typing import Any

import gevent
from gevent import socket

__all__ = ["FaultProxy"]


def _reset(sock: Any) -> None:
    """Close with RST instead of FIN (SO_LINGER 0), as a crashed peer or a middlebox does."""
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Link:
    def __init__(self, proxy: FaultProxy, client: Any, server: Any) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.up_bytes = self.down_bytes = 0
        self.closed = False
        self.mute = False  # drop server-to-client data (the reply is "in the network" when the reset hits)
        self.greenlets = [gevent.spawn(self._pump, client, server, True),
                          gevent.spawn(self._pump, server, client, False)]

    def _pump(self, src: Any, dst: Any, upstream: bool) -> None:
        p = self.proxy
        try:
            while not self.closed:
                data = src.recv(65536)
                if not data:
                    try:
                        dst.shutdown(stdsocket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if p.blackhole or (self.mute and not upstream):
                    continue  # swallowed: the peer hears nothing, forever
                if p.latency:
                    gevent.sleep(p.latency)
                if upstream:
                    self.up_bytes += len(data)
                    if p.reset_after_upstream is not None and self.up_bytes >= p.reset_after_upstream:
                        self.mute = True
                        dst.sendall(data)
                        gevent.sleep(0.05)  # let the server read (and run) the request before the reset
                        p.resets += 1
                        if p.one_shot:
                            p.reset_after_upstream = None
                        self.abort()
                        return
                else:
                    cut = p.cut_downstream_after
                    if cut is not None and self.down_bytes + len(data) > cut:
                        dst.sendall(data[: max(0, cut - self.down_bytes)])
                        p.cuts += 1
                        if p.one_shot:
                            p.cut_downstream_after = None
                        self.abort()
                        return
                    self.down_bytes += len(data)
                step = p.slice or len(data)
                for i in range(0, len(data), step):
                    dst.sendall(data[i:i + step])
                    if p.slice and p.slice_delay:
                        gevent.sleep(p.slice_delay)
        except OSError:
            self.abort()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            _reset(self.client)
            _reset(self.server)


class FaultProxy:
    """Listen on 127.0.0.1 (port 0) and forward every connection to ``upstream`` with the toxics set."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.latency = 0.0  # seconds added before forwarding each chunk, both ways
        self.slice = 0  # forward in writes of this many bytes (0: as received)
        self.slice_delay = 0.0
        self.blackhole = False  # swallow everything in both directions
        self.reset_after_upstream: int | None = None  # RST both ends once this many request bytes passed
        self.cut_downstream_after: int | None = None  # forward this many reply bytes, then RST both ends
        self.one_shot = True  # reset/cut toxics disarm after firing once
        self.resets = self.cuts = self.accepted = 0
        self.links: list[_Link] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self._acceptor = gevent.spawn(self._accept)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            self.accepted += 1
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            self.links.append(_Link(self, client, server))

    def close(self) -> None:
        self._acceptor.kill()
        self.listener.close()
        for link in self.links:
            link.abort()
            gevent.killall(link.greenlets, block=False)
