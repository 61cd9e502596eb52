"""One client connection: read lines, run handlers, write one reply per request in order.

The greenlet that holds the *reader* role reads, parses and runs each handler inline, so a fast
handler costs no greenlet switch and the replies of a pipelined batch go out in one ``send``. When a
handler blocks (the hub gets control while it runs), a hub callback hands the reader role to a new
greenlet: the blocked greenlet keeps only its request and a reserved place in the output queue,
while the connection goes on reading. Replies therefore stay in request order, slow requests run
concurrently, and nothing is spawned for requests that never block.

An idle connection holds no greenlet: when ``recv`` finds nothing, the reader *parks* the connection
on its socket's read watcher and returns its greenlet to the server's
:class:`~geventtcp.readers.ReaderPool`; input (or a stop: idle timeout, drain) resumes it in a free
greenlet. TLS connections keep their greenlet (an SSL socket can hold decrypted bytes the watcher
cannot see).

Who closes what: the :class:`Connection` owns its socket and closes it once the reader has stopped
and the last request in flight has been answered (or the peer is gone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gevent import GreenletExit, getcurrent

from .codec import Codec
from .errors import HANDLER_CODES, Code, HandlerError, ProtocolError, ServerRefusal
from .protocol import LineBuffer, Request, encode_error, encode_goaway, encode_reply, parse_request
from .security import PREAUTH_MAX_LINE_BYTES
from .sockets import linger, unsent_bytes

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Connection", "DeadlineReached", "Stop"]

log = logging.getLogger("geventtcp.server")

#: Bytes asked of the kernel per ``recv``.
RECV_SIZE = 65536
#: Replies queued behind a blocked request before the reader stops reading (slow-reader bound).
MAX_QUEUED_REPLIES = 1024
#: Reply bytes a pipelined batch may queue before the reader sends them (and so, with a peer that
#: reads nothing, blocks instead of reading on): one 64 KiB read of tiny requests could otherwise
#: queue thousands of large replies.
FLUSH_BYTES = 1 << 20


class DeadlineReached(BaseException):
    """Thrown into a handler at its deadline; a BaseException so ``except Exception`` cannot eat it."""


class Stop(BaseException):
    """Thrown into a reader parked in ``recv`` to end reading; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Slot:
    """A reserved place in the output queue for the reply of a request that is still running."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


class Connection:
    """Serves one accepted socket; created and run by :class:`geventtcp.server.Server`."""

    # Slots, because an idle connection should cost little: past 29 attributes CPython 3.11 stops
    # sharing instance-dict keys and every connection would carry its own ~1.6 KB dict. ``__dict__``
    # stays available (created only when something sets an attribute not listed here).
    __slots__ = (
        "server", "sock", "address", "calls", "auth_failures", "buffer", "lines", "pos", "out", "open_slots",
        "flushing", "queued_bytes", "inflight", "reader", "handlers", "running", "watch_armed", "receiving",
        "reading_done", "closed", "goaway", "error_line", "active_tick", "partial_tick", "writer", "write_tick",
        "requests", "created_tick", "drained", "_raw_send", "close_pending", "received", "write_unsent",
        "parked", "eager", "_raw_recv", "_read_watcher", "__dict__", "__weakref__",
    )

    def __init__(self, server: Server, sock: Any, address: Any) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        # Until AUTH succeeds (when auth is on) only the pre-auth table and line limit apply; with
        # auth off this is the server's table and the request path pays nothing for auth.
        self.calls: dict[int, Callable[[Request], Any]] = server.calls if server.token is None else server.preauth_calls
        self.auth_failures = 0
        self.buffer = LineBuffer(server.settings.max_line_bytes if server.token is None
                                 else min(server.settings.max_line_bytes, PREAUTH_MAX_LINE_BYTES))
        self.lines: list[bytes | None] = []
        self.pos = 0
        self.out: list[Any] = []  # reply bytes and _Slots, in request order
        self.open_slots = 0  # _Slots in ``out``, filled or not
        self.flushing = False
        self.queued_bytes = 0  # bytes of inline replies appended since the last flush
        self.inflight = 0  # requests handed off to their own greenlet, not yet answered
        self.reader: Any = None
        self.handlers: set[Any] = set()  # greenlets running handed-off requests
        self.running: Request | None = None
        self.watch_armed = False
        self.receiving = False
        self.reading_done = False
        self.closed = False
        self.goaway: str | None = None  # reason to send a goaway line before closing
        self.error_line: bytes | None = None  # a final error line instead of a goaway
        self.active_tick = server.tick
        self.partial_tick = -1
        self.writer: Any = None
        self.write_tick = 0
        self.write_unsent = -1  # the send queue size the watchdog last saw while a send blocked
        self.requests = 0
        self.created_tick = server.tick
        self.drained: Any = None  # an Event a waiter may set up (reader stalled on a slow peer)
        self.close_pending = False  # reading is done and nothing is in flight, but a send is under way
        self.received = 0.0  # clock() when the current batch of lines was read (deadlines count from it)
        self.parked = False  # waiting for input with no greenlet: the read watcher will resume it
        # Whether input is waiting, to be read before parking or stopping: on a new connection and
        # when the watcher resumed it. After a batch the reader parks at once: a lone request's next
        # read would almost always fail with EAGAIN (whose exception costs more than the read), and
        # a peer that keeps the buffer full still lets the hub serve the other connections between
        # two reads.
        self.eager = True
        raw = getattr(sock, "_sock", None) if server.plain_sockets else None
        self._raw_send: Callable[[Any], int] | None = raw.send if raw is not None else None
        # A plain gevent socket: recv without blocking, and park on its read watcher when empty.
        watcher = getattr(sock, "_read_event", None) if raw is not None else None
        self._raw_recv: Callable[[int], bytes] | None = raw.recv if raw is not None and watcher is not None else None
        self._read_watcher: Any = watcher

    # -- reading ---------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run the connection in the calling greenlet until it is closed or parks (idle, no greenlet)."""
        self._read_loop()

    def _park(self) -> None:
        """Wait for input without a greenlet: on input the socket's read watcher has the hub start
        :meth:`_read_loop` in a free reader greenlet (which first stops the watcher)."""
        self.reader = None
        self.parked = True
        self.receiving = True
        self._read_watcher.start(self.server.readers.run, self._read_loop)

    def _unwatch(self) -> None:
        """Stop waiting on the read watcher: the connection is resumed, stopped or closed."""
        self._read_watcher.stop()
        self.parked = False
        self.receiving = False

    def _unpark(self, stop: str) -> None:
        """Hub-side: end a parked connection's reading for ``stop``, in a reader greenlet."""
        self._unwatch()
        self.server.readers.run(self._stop_parked, stop)

    def _stop_parked(self, reason: str) -> None:
        self.reader = getcurrent()
        self._on_stop(reason)
        self.reading_done = True
        self._maybe_close()

    def _read_loop(self) -> None:
        """Read and dispatch until EOF, a stop, a handoff (this greenlet keeps its request) or a park."""
        self.reader = me = getcurrent()
        if self.parked:  # resumed by the read watcher: _unwatch() inline (once per request)
            self._read_watcher.stop()
            self.parked = False
            self.receiving = False
        server = self.server
        sock = self.sock
        buffer = self.buffer
        dispatch = self._dispatch
        raw_recv = self._raw_recv
        try:
            while True:
                lines = self.lines
                pos = self.pos
                end = len(lines)
                while pos < end:
                    pos += 1
                    self.pos = pos  # a handoff inside dispatch continues from here
                    if not dispatch(lines[pos - 1], me):
                        return  # handed off: this greenlet now only answers its own request
                    if self.closed:
                        return
                if self.out:
                    self._flush()
                    if self.closed:
                        return
                # Input that resumed a reader parked on half a line is read first: a drain leaves
                # such a connection parked until the rest comes, and that line is then answered.
                if (server.draining or self.goaway is not None) and not (self.eager and buffer.pending):
                    self.goaway = self.goaway or server.drain_reason
                    break
                if len(self.out) > MAX_QUEUED_REPLIES:
                    self._wait_drained()
                    if self.closed:
                        return
                    continue
                if raw_recv is not None:
                    data = None
                    if self.eager:
                        try:
                            data = raw_recv(RECV_SIZE)
                        except BlockingIOError:
                            pass
                    if data is None:
                        # Park outside the except block: a handled exception stays referenced (with
                        # its traceback) while the block runs. The greenlet is free from here on.
                        self.eager = True  # the watcher resumes it only when there is input
                        self._park()
                        return
                else:
                    self.receiving = True
                    try:
                        data = sock.recv(RECV_SIZE)
                    finally:
                        self.receiving = False
                if not data:
                    break  # EOF: answer what is in flight, then close
                self.received = server.clock()
                self.active_tick = server.tick
                self.lines = buffer.feed(data)
                self.pos = 0
                self.eager = False
                if buffer.incomplete:
                    if self.partial_tick < 0 or self.lines:  # the unfinished line began in this read
                        self.partial_tick = server.tick
                else:
                    self.partial_tick = -1
        except Stop as stop:
            self._on_stop(stop.reason)
        except OSError as exc:
            log.debug("connection %s: %s", self.address, exc)
            self.abort()
            return
        self.reading_done = True
        self._maybe_close()

    def _on_stop(self, reason: str) -> None:
        codec = self.server.codec
        if reason == "slow":
            self.server.stats.slow_request_disconnections += 1
            timeout = self.server.settings.request_timeout
            self.error_line = encode_error(
                codec, Code.REQUEST_TIMEOUT, f"request line not completed within {timeout:g}s"
            )
        elif reason == "auth":
            timeout = self.server.settings.auth_timeout
            self.error_line = encode_error(codec, Code.UNAUTHENTICATED, f"not authenticated within {timeout:g}s")
        elif reason == "write":
            log.info("connection %s: no write progress for %ss, closing", self.address,
                     self.server.settings.write_timeout)
            self.abort()
        else:
            self.goaway = reason

    def authenticate(self) -> None:
        """AUTH succeeded: switch to the full command table and line limit."""
        self.calls = self.server.calls
        self.buffer.max_line_bytes = self.server.settings.max_line_bytes

    def close_after_replies(self) -> None:
        """Stop reading after the lines already received; answer them, then close (no goaway line)."""
        self.error_line = b""
        if self.goaway is None:
            self.goaway = "closing"

    def _wait_drained(self) -> None:
        from gevent.event import Event

        self.drained = Event()
        try:
            self.drained.wait()
        finally:
            self.drained = None

    # -- dispatching -----------------------------------------------------------------------------

    def _dispatch(self, line: bytes | None, me: Any) -> bool:
        """Answer one line; return False when this greenlet lost the reader role to a handoff.

        This is the request path: it runs once per request, so it reads each attribute once into a
        local, calls the clock twice and leaves rare cases to helper calls.
        """
        server = self.server
        codec = server.codec
        if line is None:
            limit = server.settings.max_line_bytes
            self.out.append(encode_error(codec, Code.TOO_LARGE, f"request line longer than {limit} bytes"))
            server.stats.protocol_errors += 1
            return True
        try:
            req = parse_request(line, codec, self.address, self.received)
        except ProtocolError as exc:
            if not line.strip():
                return True  # blank lines are ignored
            server.stats.protocol_errors += 1
            self.out.append(encode_error(codec, exc.code, exc.msg, exc.cmdid, exc.id, exc.id is not None))
            return True
        except Exception:  # a parser bug must cost one 400, never the connection
            log.exception("request line from %s could not be parsed", self.address)
            server.stats.protocol_errors += 1
            self.out.append(encode_error(codec, Code.BAD_REQUEST, "invalid request"))
            return True
        self.requests += 1
        cmdid = req.cmdid
        call = self.calls.get(cmdid)
        if call is None:
            return self._refuse_unknown(req)
        refusal = server.admit(self, req)
        if refusal is not None:
            self.out.append(encode_error(codec, refusal[0], refusal[1], cmdid, req.id, req.has_id))
            server.stats.record(cmdid, refusal[0], 0.0)
            return True
        req.connection = self
        if not self.watch_armed:
            self.watch_armed = True
            watching = server.watching
            if not watching:
                server.loop.run_callback(server._watch_all)
            watching.append(self)
        self.running = req
        clock = server.clock
        started = clock()
        code: int
        try:
            try:
                data = call(req)
            finally:
                # Before anything that could yield (logging, encoding): once the handler has
                # returned, no handoff and no deadline may land on this greenlet any more.
                if self.running is req:
                    self.running = None
                timer = req._timer
                if timer is not None:
                    timer.stop()
                    timer.close()
        except DeadlineReached:
            reply = encode_error(codec, Code.DEADLINE_EXCEEDED, "deadline exceeded", cmdid, req.id, req.has_id)
            code = Code.DEADLINE_EXCEEDED
        except HandlerError as exc:  # application codes and 400 only; anything else becomes a 500
            reply, code = encode_handler_error(codec, exc, cmdid, req.id, req.has_id)
        except BaseException as exc:  # sys.exit(), an escaped gevent.Timeout: a 500, never the connection
            if isinstance(exc, GreenletExit) and self.closed:  # killed by Server.close: nobody to answer
                self._drop_slot(req, me)
                raise
            log.exception("handler for cmdid %d raised (peer %s, id %r)", cmdid, self.address, req.id)
            reply = encode_error(codec, Code.INTERNAL, "internal error", cmdid, req.id, req.has_id)
            code = Code.INTERNAL
        else:
            try:
                reply = encode_reply(codec, cmdid, data, req.id, req.has_id)
                code = 0
            except (ValueError, TypeError, OverflowError) as exc:
                log.error("result of cmdid %d is not serializable: %r", cmdid, exc)
                reply = encode_error(codec, Code.INTERNAL, "result not serializable", cmdid, req.id, req.has_id)
                code = Code.INTERNAL
        if len(reply) > server.max_reply_bytes:
            reply = encode_error(codec, Code.TOO_LARGE, "reply too large", cmdid, req.id, req.has_id)
            code = Code.TOO_LARGE
        elapsed = clock() - started
        server.stats.record(cmdid, code, elapsed)
        access_log = server.access_log
        if access_log is not None:
            access_log(self, req, code, elapsed)
        slot = req._slot
        if slot is None:
            self.out.append(reply)
            self.queued_bytes += len(reply)
            if self.queued_bytes > FLUSH_BYTES:
                self._flush()
            return True
        # Handed off while the handler blocked: fill the reserved place and leave.
        self._drop_slot(req, me)
        slot.data = reply
        if not self.closed:
            self._flush()
            self._maybe_close()
        return False

    def _drop_slot(self, req: Request, me: Any) -> None:
        """A handed-off request is over: it no longer counts in flight (its slot stays in ``out``)."""
        if req._slot is not None:
            self.handlers.discard(me)
            self.inflight -= 1
            self.server.inflight -= 1

    def _refuse_unknown(self, req: Request) -> bool:
        """Answer a cmdid this connection may not call: 401 before AUTH, else 404."""
        server = self.server
        if self.calls is not server.calls:
            code, msg = Code.UNAUTHENTICATED, "authentication required"
        else:
            code, msg = Code.UNKNOWN_COMMAND, f"unknown cmdid {req.cmdid}"
        self.out.append(encode_error(server.codec, code, msg, req.cmdid, req.id, req.has_id))
        server.stats.unknown_commands += 1
        return True

    def _watch(self) -> None:
        """Runs in the hub once the reader yielded (``Server._watch_all``): if it is inside a handler,
        hand off."""
        self.watch_armed = False
        req = self.running
        if req is None or self.closed:
            return
        self.running = None
        server = self.server
        slot = _Slot()
        req._slot = slot
        self.out.append(slot)
        self.open_slots += 1
        self.inflight += 1
        server.inflight += 1
        deadline = server.deadline_for(req)
        if deadline is not None:
            timer = server.loop.timer(max(0.0, deadline - server.clock()))
            timer.start(self.reader.throw, DeadlineReached)
            req._timer = timer
        self.handlers.add(self.reader)
        self.reader = None
        self.server.readers.run(self._read_loop)

    # -- writing ---------------------------------------------------------------------------------

    def _take_ready(self) -> bytes:
        out = self.out
        if not self.open_slots:
            self.out = []
            return out[0] if len(out) == 1 else b"".join(out)
        ready: list[bytes] = []
        taken = 0
        for item in out:
            if type(item) is bytes:
                ready.append(item)
            elif item.data is not None:
                ready.append(item.data)
                self.open_slots -= 1
            else:
                break
            taken += 1
        del out[:taken]
        return b"".join(ready)

    def _flush(self) -> None:
        """Send every reply that is ready, in order; one greenlet at a time does the sending."""
        if self.flushing or not self.out:
            return
        self.flushing = True
        raw_send = self._raw_send
        try:
            self.queued_bytes = 0
            while self.out and not self.closed:
                if self.open_slots:
                    data = self._take_ready()
                    if not data:
                        break
                else:  # every queued reply is ready (no handoff pending): take them all
                    out = self.out
                    data = out[0] if len(out) == 1 else b"".join(out)
                    self.out = []
                sent = 0
                if raw_send is not None:  # the kernel usually takes it all: no wait, no switch
                    try:
                        sent = raw_send(data)
                    except BlockingIOError:
                        pass
                    if sent == len(data):
                        continue
                self._send_rest(data, sent)
        except OSError as exc:
            log.debug("connection %s: send failed: %s", self.address, exc)
            self.abort()
        except Stop:
            self.abort()
        finally:
            self.flushing = False
            drained = self.drained
            if drained is not None and len(self.out) <= MAX_QUEUED_REPLIES // 2:
                drained.set()
        if self.close_pending:
            self.close_pending = False
            self._maybe_close()

    def _send_rest(self, data: bytes, sent: int) -> None:
        """Send ``data`` from byte ``sent`` on, waiting for the socket (the watchdog's write timeout
        interrupts a peer that stops reading: ``Stop`` or ``OSError``, which the caller handles)."""
        self.writer = getcurrent()
        self.write_tick = self.server.tick
        self.write_unsent = unsent_bytes(self.sock)  # the watchdog measures progress from here
        try:
            self.sock.sendall(memoryview(data)[sent:] if sent else data)
        finally:
            self.writer = None

    # -- closing ---------------------------------------------------------------------------------

    def _maybe_close(self) -> None:
        """Close once reading has stopped and every request in flight has been answered and sent.

        While another greenlet is sending (a large reply to a slow reader), closing now would cut
        that reply and drop what is queued behind it: the flusher closes when it is done instead.
        """
        if self.closed or not self.reading_done or self.inflight:
            return
        if self.flushing:
            self.close_pending = True
            return
        final = self.error_line
        if final is None and self.goaway is not None:
            final = encode_goaway(self.server.codec, self.goaway)
        if final is not None:
            self.out.append(final)
        self._flush()
        if self.closed:
            return
        self.closed = True
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close, read and drop what the peer still sends (bounded), then close.

        Closing with unread input makes the kernel send RST, which can destroy replies the peer
        has not read yet; nginx's lingering_close does the same dance.
        """
        try:
            linger(self.sock)
        except Stop:
            pass
        finally:
            self._release()

    def abort(self) -> None:
        """Close at once: replies not yet sent are dropped (the peer is gone or too slow)."""
        self.closed = True
        self.reading_done = True
        if self.drained is not None:
            self.drained.set()  # a reader waiting for the output queue must see the close
        self._release()

    def _release(self) -> None:
        if self.parked:  # closing a socket under a started watcher would throw into its callback's owner
            self._unwatch()
        try:
            self.sock.close()
        finally:
            self.server.forget(self)

    def interrupt(self, reason: str) -> None:
        """Hub-side: end a wait of this connection's greenlets for ``reason``.

        ``slow`` and the goaway reasons stop a reader parked in ``recv`` (a goaway only when no
        request line is half received); ``write`` stops a writer stuck on a peer that reads nothing.
        Call it from a hub callback (``loop.run_callback``) so that the state checked here is the
        state the greenlet is in when the exception lands.
        """
        if self.closed:
            return
        if reason == "write":
            if self.writer is not None:
                self.server.stats.write_timeout_disconnections += 1
                self.writer.throw(Stop(reason))
            return
        fatal = reason in ("slow", "auth")  # an error line and close, even with half a line received
        if not fatal and self.goaway is None:
            self.goaway = reason
        reader = self.reader
        if self.receiving and (fatal or not self.buffer.pending):
            if self.parked:
                self._unpark(reason)
            elif reader is not None:
                reader.throw(Stop(reason))


def encode_handler_error(codec: Codec, exc: HandlerError, cmdid: Any, id: Any, has_id: bool) -> tuple[bytes, int]:
    """The reply line to a :class:`HandlerError` a handler raised, and its code (the error path only).

    Its code and message, plus ``"details"`` when it has some. A 500 ``internal error`` (the
    request's id kept) instead when the code is not one a handler may answer with (changed after
    the error was built, or a subclass's own) or the details have no strict JSON form (a lone
    surrogate included, which the client would refuse): no handler reply reads as a transport code.
    """
    code = exc.code
    if type(exc) is ServerRefusal and type(cmdid) is int and cmdid < 0:  # a built-in's own code (AUTH's 401)
        return encode_error(codec, code, exc.msg, cmdid, id, has_id), int(code)
    if (type(code) is not int and not isinstance(code, Code)) or code not in HANDLER_CODES:
        log.error(
            "handler for cmdid %r raised %s with code %r, which handlers cannot answer with: sent a 500",
            cmdid, type(exc).__name__, code)
        return encode_error(codec, Code.INTERNAL, "internal error", cmdid, id, has_id), Code.INTERNAL
    line = encode_error(codec, code, exc.msg, cmdid, id, has_id)
    details = getattr(exc, "details", None)
    if details is None:
        return line, int(code)
    try:
        body = codec.dumps(details)
        if 92 in body:  # an escape: maybe of a lone surrogate, which no peer may be sent
            Codec._post_check(body, details)
    except (ValueError, TypeError, OverflowError) as err:
        log.error(
            "details of the %s raised by the handler for cmdid %r are not serializable: %r: sent a 500",
            type(exc).__name__, cmdid, err)
        return encode_error(codec, Code.INTERNAL, "error details not serializable", cmdid, id, has_id), Code.INTERNAL
    return b'%b,"details":%b}\n' % (line[:-2], body), int(code)

