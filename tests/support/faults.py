"""Fault injection for client tests: ``FaultProxy`` (a toxiproxy-like TCP proxy on gevent) and ``FakeServer``
(a raw listener that answers what a real server never would).

The proxy's toxics are plain attributes, read for every chunk, so a test can turn them on and off
while connections are open. ``upstream`` is client-to-server, ``downstream`` server-to-client.
"""

from __future__ import annotations

import json
import time
from typing import Any

import gevent
from gevent import socket
from gevent.queue import Queue

from tests.support.rawconn import rst

__all__ = ["FaultProxy", "FakeServer"]


class _Link:
    """One proxied connection: a pump each way; ``abort`` resets both ends."""

    def __init__(self, proxy: FaultProxy, client: Any, server: Any) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.up_bytes = self.down_bytes = 0
        self.closed = False
        self.mute = False  # drop server-to-client data (the reply is "in the network" when the reset hits)
        self.greenlets = [gevent.spawn(self._pump, client, server, True),
                          gevent.spawn(self._pump, server, client, False)]

    def _pump(self, src: Any, dst: Any, upstream: bool) -> None:
        """Forward inline while there is no latency: nothing is read before the last chunk went out, so a
        slow ``rate`` pushes back on the sender. With latency, chunks queue and go out ``latency`` after
        they arrived (a long link, not a slow one)."""
        delayed: Queue[Any] | None = None
        writer: Any = None
        try:
            while not self.closed:
                data = src.recv(65536)
                latency = self.proxy.latency
                if latency:
                    if delayed is None:
                        delayed = Queue()
                        writer = gevent.spawn(self._write_delayed, delayed, dst, upstream)
                        self.greenlets.append(writer)
                    delayed.put((time.monotonic() + latency, data))
                    if not data:
                        return
                    continue
                if delayed is not None:  # latency turned off: what is queued goes first, in order
                    delayed.put(None)
                    writer.join()
                    delayed = writer = None
                if not self._forward(dst, data, upstream):
                    return
        except OSError:
            self.abort()

    def _write_delayed(self, delayed: Queue[Any], dst: Any, upstream: bool) -> None:
        try:
            for item in delayed:
                if item is None:
                    return
                due, data = item
                gevent.sleep(max(0.0, due - time.monotonic()))
                if not self._forward(dst, data, upstream):
                    return
        except OSError:
            self.abort()

    def _forward(self, dst: Any, data: bytes, upstream: bool) -> bool:
        """Pass one chunk on (EOF: half-close ``dst``); False when this direction is done."""
        if data:
            return self._deliver(dst, data, upstream)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return False

    def _deliver(self, dst: Any, data: bytes, upstream: bool) -> bool:
        """Apply the toxics to one chunk and forward what is left; False once the link is aborted."""
        p = self.proxy
        if p.blackhole or (self.mute and not upstream):
            return True  # swallowed: the peer hears nothing, forever
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
                return False
        else:
            cut = p.cut_downstream_after
            if cut is not None and self.down_bytes + len(data) > cut:
                dst.sendall(data[: max(0, cut - self.down_bytes)])
                p.cuts += 1
                if p.one_shot:
                    p.cut_downstream_after = None
                self.abort()
                return False
            self.down_bytes += len(data)
        step = p.slice or len(data)
        for i in range(0, len(data), step):
            dst.sendall(data[i:i + step])
            if p.slice and p.slice_delay:
                gevent.sleep(p.slice_delay)
            if p.rate:
                gevent.sleep(step / p.rate)
        return True

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            rst(self.client)
            rst(self.server)


class FaultProxy:
    """Listen on 127.0.0.1 (port 0) and forward every connection to ``upstream`` (``host:port`` or a
    tuple) with the toxics set; the constructor's keywords set the initial toxics."""

    def __init__(self, upstream: str | tuple[str, int], *, latency: float = 0.0, slice: int = 0,
                 rate: float = 0.0) -> None:
        if isinstance(upstream, str):
            host, port = upstream.rsplit(":", 1)
            upstream = (host, int(port))
        self.upstream = upstream
        self.latency = latency  # seconds each chunk is held, both ways (queued: a long link, not a slow one)
        self.slice = slice  # forward in writes of this many bytes (0: as received)
        self.slice_delay = 0.0
        self.rate = rate  # bytes/s forwarded (0: unlimited); with it the client's receive buffer is small
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
            if self.rate:  # a small receive buffer, so that a slow forward pushes back on the sender
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                rst(client)
                continue
            self.links.append(_Link(self, client, server))

    def close(self) -> None:
        self._acceptor.kill()
        self.listener.close()
        for link in self.links:
            link.abort()
            gevent.killall(link.greenlets, block=False)


class FakeServer:
    """A raw listener in this process: each accepted socket goes to ``behaviour(sock, n)`` in a greenlet
    (``n`` counts connections from 0). For replies a real server would never send.

    It is a server before protocol 1.1: :meth:`read_line` answers a HELLO (cmdid -5) line with the
    404 such a server sends, as the first thing on the connection, and returns the next line (the
    HELLOs answered are counted in ``hellos``). With ``answer_hello=False`` the behaviour sees it.
    """

    def __init__(self, behaviour: Any, answer_hello: bool = True) -> None:
        self.behaviour = behaviour
        self.answer_hello = answer_hello
        self.hellos = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.accepted = 0
        self.lines: list[bytes] = []
        self.reads: list[int] = []  # what a behaviour counts per recv (lines per read, ...)
        self._loop = gevent.spawn(self._accept)
        self._greenlets: list[Any] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            sock, _ = self.listener.accept()
            n = self.accepted
            self.accepted += 1
            self._greenlets.append(gevent.spawn(self._run, sock, n))

    def _run(self, sock: Any, n: int) -> None:
        try:
            self.behaviour(self, sock, n)
        except OSError:
            pass
        finally:
            sock.close()

    def read_line(self, sock: Any, buf: list[bytes]) -> bytes | None:
        """Next request line from ``sock`` (``buf`` holds leftovers between calls); None at EOF."""
        data = b"".join(buf)
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        line, _, rest = data.partition(b"\n")
        buf[:] = [rest]
        if self.answer_hello and line.startswith(b'{"cmdid":-5,'):
            self.hellos += 1
            rid = json.loads(line)["id"]
            sock.sendall(b'{"code":404,"cmdid":-5,"id":%d,"msg":"unknown cmdid -5"}\n' % rid)
            return self.read_line(sock, buf)
        self.lines.append(line)
        return line

    def close(self) -> None:
        self._loop.kill()
        gevent.killall(self._greenlets)
        self.listener.close()
