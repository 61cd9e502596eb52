"""Gevent-world connections that coalesce the request lines of many greenlets into one ``send``."""

from __future__ import annotations

import time
from typing import Any

import gevent
from gevent import Timeout

from geventtcp.client.call import Call, request_line
from geventtcp.client.connection import ClientConnection
from geventtcp.errors import CallTimeout, NotSent

__all__ = ["BatchingConnection", "FLUSH_LINES"]

#: Lines queued in one loop turn that are sent at once rather than at the end of the turn: when a
#: reply batch wakes a hundred greenlets, the server works on the first lines while the client
#: still runs the others (the two overlap instead of taking turns).
FLUSH_LINES = 16


class BatchingConnection(ClientConnection):
    """A :class:`ClientConnection` for greenlets of one hub, on a plain (non-TLS) gevent socket.

    A request line is queued, and a hub callback sends everything queued in that turn of the event
    loop with one non-blocking ``send``: when a reply batch wakes a hundred greenlets, their next
    requests leave together and the server reads them together, instead of one wake-up of the
    server per request. Every :data:`FLUSH_LINES` queued lines leave at once, without waiting for
    the end of the turn, so that the server works on them while the client runs the other greenlets.
    A caller alone pays nothing extra (its reader waits on the socket anyway,
    which runs the callback first). If the socket buffer is full, a greenlet finishes the send.

    Failure behaviour: a request is *written* once its last byte is accepted by the kernel. When the
    send fails, written requests fail with MaybeExecuted and queued or partly sent ones with NotSent
    (the connection is closed, so the server never sees a partial line); a caller that gives up on
    a queued request takes it out of the queue, or, once its sending started, abandons it.
    """

    def __init__(self, sock: Any, address: str, world: Any, codec: Any, max_reply_bytes: int) -> None:
        super().__init__(sock, address, world, codec, max_reply_bytes)
        self.out: list[bytes] = []
        self.out_calls: list[Call] = []
        self.flush_armed = False
        self.sender: Any = None  # the greenlet finishing a send the kernel did not take at once
        self._raw_send = sock._sock.send  # the OS socket is non-blocking under gevent
        self._loop = world.key.loop

    def _send(self, cmdid: int, params: Any, deadline: float, meta: bytes = b"") -> None:
        # ``send`` promises the line was written when it returns: flush now rather than next turn.
        call = Call(0, deadline, True)
        self._write(cmdid, params, call, deadline, False, meta)
        if self.sender is None:
            self._flush()
        while not call.written and self.sender is not None and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeout(f"timed out writing the request to {self.address}")
            self.sender.join(remaining)
        if not call.written:
            raise NotSent(f"request to {self.address} not sent: {self.reason or 'connection closed'}")
        self.poll()

    def _write(self, cmdid: int, params: Any, call: Call, deadline: float, claim: bool = False,
               meta: bytes = b"") -> bool:
        """Queue the line (the reader role is never claimed here: the line leaves on the next turn)."""
        now = time.monotonic()
        line = request_line(self.codec, cmdid, params, call, next(self._ids), now, self.address, meta)
        with self.state:
            self._register_locked(call)
            call.queued = True
            self.out.append(line)
            self.out_calls.append(call)
        self.last_active = now
        if self.sender is None:
            if len(self.out) >= FLUSH_LINES:
                self._send_out()  # the server starts on these while the rest of the turn runs
            elif not self.flush_armed:
                self.flush_armed = True
                self._loop.run_callback(self._flush)
        return False

    def _flush(self) -> None:
        """Hub callback: send the queue without blocking; hand any rest to a sender greenlet."""
        self.flush_armed = False
        self._send_out()

    def _send_out(self) -> None:
        if self.sender is not None or self.closed or not self.out:
            return
        lines, calls = self.out, self.out_calls
        self.out, self.out_calls = [], []
        data = lines[0] if len(lines) == 1 else b"".join(lines)
        try:
            sent = self._raw_send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(f"write failed: {exc}")
            return
        if sent == len(data):
            for call in calls:
                call.written = True
                call.queued = False
            return
        ends: list[int] = []
        end = 0
        for line in lines:
            end += len(line)
            ends.append(end)
        self._mark_written(calls, ends, sent)
        self.sender = gevent.spawn(self._send_rest, memoryview(data), sent, calls, ends)

    @staticmethod
    def _mark_written(calls: list[Call], ends: list[int], sent: int) -> None:
        for call, end in zip(calls, ends, strict=True):
            if end <= sent and call.queued:
                call.written = True
                call.queued = False

    def _send_rest(self, data: memoryview, sent: int, calls: list[Call], ends: list[int]) -> None:
        sock = self.sock
        # Bounded by this greenlet's own timer: the socket's timeout is shared with readers (GeventIO).
        timer = Timeout(max(0.0, max(call.deadline for call in calls) - time.monotonic()),
                        TimeoutError("timed out writing requests"))
        timer.start()
        try:
            while sent < len(data):
                sent += sock.send(data[sent:])
                self._mark_written(calls, ends, sent)
        except BaseException as exc:  # a kill too: the rest of a line may be unsent, so the stream is lost
            self.sender = None
            self._fail(f"write failed: {exc!r}")
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            timer.close()
        self.sender = None
        if self.out and not self.flush_armed:
            self.flush_armed = True
            self._loop.run_callback(self._flush)

    def _abandon(self, call: Call) -> bool:
        with self.state:
            if call.done:
                return False
            if call.queued and call in self.out_calls:  # never left this process: just forget it
                index = self.out_calls.index(call)
                del self.out_calls[index]
                del self.out[index]
                call.queued = False
                self.calls.pop(call.id, None)
                return True
            call.abandoned = True
            self.orphans += 1
            if call.written:  # its reply, if any, is dropped when it comes
                return True
        # Cancelled while its line is partly sent: stop sending (as an interrupted sendall would),
        # which breaks the stream, so the connection goes; the server never sees a partial line.
        self._fail("request cancelled while being written")
        return True

    def _fail_locked(self, reason: str, kind: Any = None) -> None:
        self.out, self.out_calls = [], []
        if kind is None:
            super()._fail_locked(reason)
        else:
            super()._fail_locked(reason, kind)
