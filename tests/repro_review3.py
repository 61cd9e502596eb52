"""Reproductions of review3 findings that FAIL on main (not collected by pytest's default pattern).

Run: ``PYTHONPATH=. python -m pytest -p no:cacheprovider tests/repro_review3.py``
"""

from __future__ import annotations

import socket as stdsocket
import time
from collections.abc import Callable

import gevent

from geventtcp import Server

from .helpers import RawConn, wait_until

Serve = Callable[..., Server]


def test_drain_answers_a_line_a_parked_connection_had_half_received(serve: Serve) -> None:
    """``interrupt`` leaves a parked connection with half a line parked (its docstring: a goaway only
    when no request line is half received), but when the rest arrives the resumed reader checks
    ``goaway`` before its ``recv`` and breaks: the line is never read, only the goaway is sent.
    A TLS connection (reader blocked in ``recv``) does answer it."""
    server = serve(graceful_timeout=5)
    with RawConn(server.address) as half:
        half.send(b'{"cmdid":1,"id":"h"')
        wait_until(lambda: any(c.buffer.pending and c.parked for c in server.connections))
        stopper = gevent.spawn(server.stop, 5)
        wait_until(lambda: all(c.goaway for c in server.connections))
        half.send(b',"params":{}}\n')
        first = half.line()
        assert first.get("id") == "h", first  # main: the goaway comes first, "h" is dropped
        assert half.line()["goaway"] == "shutdown"
        stopper.get(timeout=5)


def test_a_steady_pipeline_is_not_taken_for_a_slowloris(serve: Serve) -> None:
    """Every line completes within milliseconds, but no read ends exactly at a newline: the
    connection's ``partial_tick`` is never reset, so ``request_timeout`` closes it with a 408."""
    server = serve(request_timeout=0.5)
    line = b'{"cmdid":1,"id":%d,"params":{"pad":"abcdefghijklmnopqrstuvwxyz"}}\n'
    with RawConn(server.address) as c:
        c.sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        stream = b"".join(line % i for i in range(3000))
        sent = 0
        answered = 0

        def reader() -> None:
            nonlocal answered
            while True:
                reply = c.line(timeout=5)
                assert reply.get("id") == answered, reply
                answered += 1

        reading = gevent.spawn(reader)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and sent < len(stream) and not reading.dead:
            step = 3 * len(line % sent) // 2  # always ends inside a line
            c.send(stream[sent:sent + step])
            sent += step
            gevent.sleep(0.01)
        wait_until(lambda: reading.dead or answered >= stream[:sent].count(b"\n"), timeout=5)
        reading.kill()
        assert reading.exception is None or isinstance(reading.exception, gevent.GreenletExit), \
            f"after {answered} replies: {reading.exception!r}"  # main: a 408 after ~0.5 s
        assert server.stats.slow_request_disconnections == 0
