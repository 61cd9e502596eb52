"""One client connection: read lines, run handlers, write one reply per request (in order, or as ready).

The greenlet that holds the *reader* role reads, parses and runs each handler inline, so a fast
handler costs no greenlet switch and the replies of a pipelined batch go out in one ``send``. When a
handler blocks (the hub gets control while it runs), a hub callback hands the reader role to a new
greenlet: the blocked greenlet keeps only its request and a reserved place in the output queue,
while the connection goes on reading. Replies therefore stay in request order, slow requests run
concurrently, and nothing is spawned for requests that never block.

Completion order (protocol 1.1, after a HELLO asking for ``unordered``; see :mod:`geventtcp.protocol`):
a handed-off request that carries an id reserves no place in ``out``; its slot *floats*
(``floating``) and its reply is appended to ``out`` when ready (:meth:`Connection._fill`), to go out
with the next send. An id-less reply (or the slot of an id-less handed-off request) is a barrier:
before it is queued, a *gate* goes into ``out`` ahead of it (:meth:`Connection._barrier`) that opens
once the floating requests read before it are answered (their replies still leave as each is ready,
put in front of the gate), so everything read before it is answered first and everything queued
after it follows it. A refusal carrying the id of a floating request (a reused id) is held aside
(``held``) and queued right after that request's reply, holding back nothing else. Inline replies are
queued as always, so a pipelined batch still leaves in one send, and every reply byte counts in
``queued_bytes`` in both modes. The request path pays one
attribute test for it (``floating`` is ``None`` on a connection that never had one).

An idle connection holds no greenlet: when ``recv`` finds nothing, the reader *parks* the connection
on its socket's read watcher and returns its greenlet to the server's
:class:`~geventtcp.server.readers.ReaderPool`; input (or a stop: idle timeout, drain) resumes it in a free
greenlet. TLS connections keep their greenlet (an SSL socket can hold decrypted bytes the watcher
cannot see).

What it shares with the other connections (settings, counters, command tables, the drain flag, the
handoff watch) it reads and updates in the server's :class:`~geventtcp.server.state.ServerState`,
which it gets instead of the server: ``state.admit`` admits a request and arms the handoff watch,
whose pass (``state.watch_all``) calls :meth:`Connection.hand_off`; ``state.forget`` is told of the close.

The read state: one attribute, ``read_state``, says where the reading side is (as h11's ``_state``
does for HTTP), instead of flags kept consistent by hand. The states, ordered, and their transitions,
each made in one method:

``READING`` (0)
    A greenlet holds the reader role and runs :meth:`Connection._read_loop` (reads, dispatches,
    flushes). The start state; also after a resume and after a handoff (the new reader reads on).
``RECEIVING``
    The reader is blocked in ``sock.recv`` (a TLS or unwatchable socket): READING -> RECEIVING ->
    READING around that one call in ``_read_loop``; :meth:`Connection.interrupt` throws ``Stop`` into it.
``PARKED``
    No greenlet: the socket's read watcher resumes the connection on input. ``_park`` (READING ->
    PARKED), and back to READING inline at the top of ``_read_loop`` (resumed) or in ``_unpark``
    (stopped while idle).
``DONE``
    Reading has stopped (EOF, a stop, a goaway, AUTH's failure limit): no further line is read or
    dispatched; the connection closes once every request in flight is answered. ``_stop_reading``.
``CLOSED``
    The socket is closed or closing; nothing more is sent. ``_maybe_close`` (DONE -> CLOSED, after
    the last reply) and ``abort`` (any -> CLOSED, replies dropped). Terminal.

``RECEIVING`` and ``PARKED`` are the waiting states (:data:`WAITING`), the only ones in which the
watchdog's idle, slow-line and age timeouts apply. Three flags stay apart because they are not
about reading: ``flushing`` and ``close_pending`` belong to the writer role, which another greenlet
(a handed-off handler) may hold in any read state; ``watch_armed`` belongs to the handoff watch in
the server's state. ``eager`` is a hint about the socket used while READING (input known waiting).

Who closes what: the :class:`Connection` owns its socket and closes it once the reader has stopped
and the last request in flight has been answered (or the peer is gone). When it is aborted (reset,
failed send, write timeout), handlers still running see ``request.cancelled``; those registered
with ``cancel_on_disconnect`` get :class:`~geventtcp.errors.RequestCancelled` at their next yield.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, Final

from gevent import GreenletExit, get_hub, getcurrent

from geventtcp.codec import Codec
from geventtcp.errors import HANDLER_CODES, Code, HandlerError, ProtocolError, RequestCancelled, ServerRefusal
from geventtcp.handler import SeedReply
from geventtcp.log import request_frame
from geventtcp.protocol import (
    BLANK,
    PREAUTH_MAX_LINE_BYTES,
    LineBuffer,
    encode_error,
    encode_goaway,
    encode_reply,
    parse_request,
)
from geventtcp.server.request import ServerRequest
from geventtcp.server.state import Handler, ServerState
from geventtcp.sockets import linger, unsent_bytes

__all__ = ["CLOSED", "DONE", "PARKED", "READING", "RECEIVING", "WAITING", "Connection", "DeadlineReached", "Stop"]

log = logging.getLogger("geventtcp.server")

# The read states (see the module docstring), ordered: plain ints, so the request path's checks are
# one comparison (READING is 0: ``if conn.read_state:`` means "not reading any more" in the loop).
READING: Final = 0
RECEIVING: Final = 1
PARKED: Final = 2
DONE: Final = 3
CLOSED: Final = 4
#: The states in which the connection waits for input (the watchdog's timeouts apply).
WAITING = frozenset({RECEIVING, PARKED})
#: Names of the read states, for logs and debugging.
READ_STATE_NAMES = {READING: "READING", RECEIVING: "RECEIVING", PARKED: "PARKED", DONE: "DONE", CLOSED: "CLOSED"}

#: Bytes asked of the kernel per ``recv``.
RECV_SIZE = 65536
#: Replies queued behind a blocked request before the reader stops reading (slow-reader bound).
MAX_QUEUED_REPLIES = 1024
#: Reply bytes a pipelined batch may queue before the reader sends them (and so, with a peer that
#: reads nothing, blocks instead of reading on): one 64 KiB read of tiny requests could otherwise
#: queue thousands of large replies. Also the most one ``send`` joins: larger queues go in chunks.
FLUSH_BYTES = 1 << 20
#: Reply bytes queued (inline replies and filled slots behind a blocked request) past which the
#: reader stops reading until the queue drains to half: with a blocked first request and a peer
#: that reads nothing, the worker holds about this much plus one reply per request in flight.
MAX_QUEUED_BYTES = FLUSH_BYTES
#: Completion order: refusals carrying the id of a floating request that a connection may hold aside
#: until that request's reply (see ``Connection._behind_floating``); past it they queue behind a barrier.
MAX_HELD_REPLIES = 64
#: Blank lines in a row (no request line among them) after which a connection is answered 400 and
#: closed: a peer that sends nothing else is broken or hostile (Redis closes on protocol errors).
MAX_BLANK_LINES = 1024
#: Lines a batch handles between two looks at the clock: past the interpreter's switch interval
#: the reader lets the hub serve other connections (as ``ServerState.watch_all`` does), while a batch
#: that is quick pays one comparison per ``_BATCH_SLICE`` lines.
_BATCH_SLICE = 64


class DeadlineReached(BaseException):
    """Thrown into a handler at its deadline; a BaseException so ``except Exception`` cannot eat it."""

    #: The reply code it becomes (read by middleware that reports codes, such as tracing's span).
    code = Code.DEADLINE_EXCEEDED


class Stop(BaseException):
    """Thrown into a reader parked in ``recv`` to end reading; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Slot:
    """A reserved place in the output queue for the reply of a request that is still running.

    ``gate``: for a floating slot (completion order) that an id-less reply was queued behind, the
    :class:`_Gate` its reply must go out before (``None``: at the end of ``out``, when ready)."""

    __slots__ = ("data", "gate")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.gate: _Gate | None = None


class _Gate(_Slot):
    """Completion order: a place in ``out`` ahead of an id-less reply that opens (``data`` becomes
    ``b""``) once the ``pending`` floating requests read before that reply are answered; their
    replies are put in front of it as each is ready, in completion order."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        super().__init__()
        self.pending = 0


class Connection:
    """Serves one accepted socket; created and run by :class:`geventtcp.server.Server` with its state."""

    # Slots, because an idle connection should cost little: past 29 attributes CPython 3.11 stops
    # sharing instance-dict keys and every connection would carry its own ~1.6 KB dict. No
    # ``__dict__``: an attribute not listed here (a misspelt one) raises instead of being created.
    __slots__ = (
        "state", "sock", "address", "calls", "auth_failures", "buffer", "lines", "pos", "out", "open_slots",
        "flushing", "queued_bytes", "inflight", "reader", "handlers", "running", "watch_armed", "read_state",
        "goaway", "error_line", "active_tick", "partial_tick", "writer", "write_tick",
        "requests", "created_tick", "drained", "_raw_send", "close_pending", "received", "write_unsent",
        "eager", "_raw_recv", "_read_watcher", "unordered", "floating", "held", "peer_cert", "orphans",
        "__weakref__",
    )

    def __init__(self, state: ServerState[Connection], sock: Any, address: Any) -> None:
        self.state = state
        self.sock = sock
        self.address = address
        # Until AUTH succeeds (when auth is on) only the pre-auth table and line limit apply; with
        # auth off this is the server's table and the request path pays nothing for auth.
        self.calls: dict[int, Handler] = state.calls if state.token is None else state.preauth_calls
        self.auth_failures = 0
        self.buffer = LineBuffer(state.settings.max_line_bytes if state.token is None
                                 else min(state.settings.max_line_bytes, PREAUTH_MAX_LINE_BYTES), skip_blank=True)
        self.lines: list[bytes | None] = []
        self.pos = 0
        self.out: list[Any] = []  # reply bytes and _Slots, in request order (completion order: see _fill)
        self.open_slots = 0  # _Slots in ``out``, filled or not
        self.flushing = False
        self.queued_bytes = 0  # reply bytes in ``out`` (replies, error lines, filled slots) not yet taken to send
        self.inflight = 0  # requests handed off to their own greenlet, not yet answered
        self.reader: Any = None
        self.handlers: dict[Any, ServerRequest] = {}  # greenlets running handed-off requests, and those requests
        self.running: ServerRequest | None = None
        self.watch_armed = False  # owned by the handoff watch: set by ``state.admit``, cleared by its pass
        self.read_state: int = READING  # see the module docstring: one of READING ... CLOSED
        self.goaway: str | None = None  # reason to send a goaway line before closing
        self.error_line: bytes | None = None  # a final error line instead of a goaway
        self.active_tick = state.tick
        self.partial_tick = -1
        self.writer: Any = None
        self.write_tick = 0
        self.write_unsent = -1  # the send queue size the watchdog last saw while a send blocked
        self.requests = 0
        self.created_tick = state.tick
        self.drained: Any = None  # an Event a waiter may set up (reader stalled on a slow peer)
        # Writer side, independent of the read state: another greenlet (a handed-off handler) may be
        # sending while the reader parks. close_pending: DONE with nothing in flight, but a send is
        # under way; the flusher closes when it is done.
        self.close_pending = False
        self.received = 0.0  # clock() when the current batch of lines was read (deadlines count from it)
        # Whether input is waiting, to be read before parking or stopping: on a new connection and
        # when the watcher resumed it (a hint about the socket while READING, not a state of its
        # own). After a batch the reader parks at once: a lone request's next read would almost
        # always fail with EAGAIN (whose exception costs more than the read), and a peer that keeps
        # the buffer full still lets the hub serve the other connections between two reads.
        self.eager = True
        raw = getattr(sock, "_sock", None) if state.plain_sockets else None
        self._raw_send: Callable[[Any], int] | None = raw.send if raw is not None else None
        # A plain gevent socket: recv without blocking, and park on its read watcher when empty.
        watcher = getattr(sock, "_read_event", None) if raw is not None else None
        self._raw_recv: Callable[[int], bytes] | None = raw.recv if raw is not None and watcher is not None else None
        self._read_watcher: Any = watcher
        # Protocol 1.1 (see "Completion order" below): set by the HELLO built-in, never cleared.
        self.unordered = False
        #: Slots of handed-off requests carrying an id, on an unordered connection, with those ids:
        #: not in ``out``; each reply is appended to ``out`` when it is ready. ``None`` until the first.
        #: A request reusing an id still floating is refused (its reply could overtake the first's).
        self.floating: dict[_Slot, Any] | None = None
        #: Refusals (400) carrying the id of a floating request with no barrier read since, each held
        #: until that request's reply is ready and then queued right after it (:meth:`_behind_floating`).
        self.held: dict[_Slot, list[bytes]] | None = None
        #: A TLS peer's certificate as ``getpeercert()`` gave it right after the handshake (set by the
        #: server; ``None`` for a plain socket): the SSL socket refuses to say once the peer shut its
        #: side down or the socket closed, and ``request.identity`` must still say who called then.
        self.peer_cert: Any = None
        #: The handed-off handlers still running when the connection was aborted (``None`` before):
        #: no longer counted in flight, but ``Server.close`` kills them (``state.orphaned``).
        self.orphans: dict[Any, ServerRequest] | None = None

    # -- the read state (see the module docstring) -----------------------------------------------

    @property
    def closed(self) -> bool:
        """The socket is closed (or closing): no reply can be delivered any more (``CLOSED``)."""
        return self.read_state == CLOSED

    @property
    def parked(self) -> bool:
        """Waiting for input with no greenlet: the read watcher will resume it (``PARKED``)."""
        return self.read_state == PARKED

    def _park(self) -> None:
        """READING -> PARKED: wait for input without a greenlet; on input the socket's read watcher has
        the hub start :meth:`_read_loop` in a free reader greenlet (which first stops the watcher:
        PARKED -> READING, inline there, once per request)."""
        self.reader = None
        self.read_state = PARKED
        self._read_watcher.start(self.state.readers.run, self._read_loop)

    def _unpark(self, stop: str) -> None:
        """Hub-side, PARKED -> DONE: end a parked connection's reading for ``stop``, in a reader greenlet."""
        self._read_watcher.stop()
        self.read_state = READING
        self.state.readers.run(self._stop_parked, stop)

    def _stop_reading(self) -> None:
        """-> DONE (unless CLOSED): no further line is read or dispatched; the connection closes once
        the requests in flight are answered (:meth:`_maybe_close`)."""
        read_state = self.read_state
        if read_state == PARKED:
            self._read_watcher.stop()
        if read_state != CLOSED:
            self.read_state = DONE

    # -- reading ---------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run the connection in the calling greenlet until it is closed or parks (idle, no greenlet)."""
        self._read_loop()

    def _stop_parked(self, reason: str) -> None:
        self.reader = getcurrent()
        self._on_stop(reason)
        self._stop_reading()
        self._maybe_close()

    def _read_loop(self) -> None:
        """Read and dispatch until EOF, a stop, a handoff (this greenlet keeps its request) or a park."""
        self.reader = me = getcurrent()
        if self.read_state == PARKED:  # resumed by the read watcher: PARKED -> READING (once per request)
            self._read_watcher.stop()
            self.read_state = READING
        state = self.state
        sock = self.sock
        buffer = self.buffer
        dispatch = self._dispatch
        raw_recv = self._raw_recv
        turn = 0.0  # when the current batch last gave the hub a turn
        try:
            while True:
                lines = self.lines
                pos = self.pos
                end = len(lines)
                if end - pos > _BATCH_SLICE:
                    end = pos + _BATCH_SLICE
                while pos < end:
                    pos += 1
                    self.pos = pos  # a handoff inside dispatch continues from here
                    if not dispatch(lines[pos - 1], me):
                        return  # handed off: this greenlet now only answers its own request
                    if self.read_state:  # READING is 0; here any other is DONE or CLOSED: no further line
                        self._stopped_in_batch()
                        return
                if pos < len(lines):  # a long batch: every _BATCH_SLICE lines, is the hub due a turn?
                    turn = self._take_turn(turn)
                    if self.read_state == CLOSED:
                        return
                    continue
                if self.out:
                    self._flush()
                    if self.read_state == CLOSED:
                        return
                # Input that resumed a reader parked on half a line is read first: a drain leaves
                # such a connection parked until the rest comes, and that line is then answered.
                if (state.draining or self.goaway is not None) and not (self.eager and buffer.pending):
                    self.goaway = self.goaway or state.drain_reason
                    break
                if self.read_state >= DONE:  # close_after_replies from a handed-off handler: read no more
                    break
                if len(self.out) > MAX_QUEUED_REPLIES or self.queued_bytes > MAX_QUEUED_BYTES:
                    self._wait_drained()
                    if self.read_state == CLOSED:
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
                    self.read_state = RECEIVING  # -> READING again, unless stopped or closed meanwhile
                    try:
                        data = sock.recv(RECV_SIZE)
                    finally:
                        if self.read_state == RECEIVING:
                            self.read_state = READING
                if not data:
                    break  # EOF: answer what is in flight, then close
                self.received = state.clock()
                self.active_tick = state.tick
                self.lines = buffer.feed(data)
                self.pos = 0
                if buffer.blank_lines:  # rare: this read brought blank lines
                    self._count_blank_lines()
                self.eager = False
                if buffer.incomplete:
                    if self.partial_tick < 0 or self.lines:  # the unfinished line began in this read
                        self.partial_tick = state.tick
                else:
                    self.partial_tick = -1
        except Stop as stop:
            self._on_stop(stop.reason)
        except OSError as exc:
            log.debug("connection %s: %s", self.address, exc)
            self.abort()
            return
        self._stop_reading()
        self._maybe_close()

    def _stopped_in_batch(self) -> None:
        """Reading stopped in the middle of a batch (AUTH's failure limit, an abort): send the replies
        already queued before waiting for the requests in flight, which may take long (in completion
        order the replies of later requests are ready too), then close once they are answered."""
        if self.read_state == DONE and self.out:
            self._flush()
        self._maybe_close()

    def _take_turn(self, since: float) -> float:
        """A long batch in the middle: past the switch interval (counted from the read, or from the
        last turn), send the replies so far and let the hub run the other connections once; returns
        the time of the last turn."""
        state = self.state
        now = state.clock()
        if now - max(since, self.received) < sys.getswitchinterval():
            return since
        if self.out:
            self._flush()
            if self.read_state == CLOSED:
                return now
        timer = state.loop.timer(0.0)  # fires after the loop has polled: other input is read first
        try:
            get_hub().wait(timer)
        finally:
            timer.close()
        return state.clock()

    def _count_blank_lines(self) -> None:
        """Count the blank lines the last read brought; too many in a row: answer what came before, then
        a 400 and close."""
        buffer = self.buffer
        self.state.stats.blank_lines += buffer.blank_lines
        buffer.blank_lines = 0
        if buffer.blank_run > MAX_BLANK_LINES and self.error_line is None:
            self.error_line = encode_goaway(self.state.codec, "bad_input",
                                            f"more than {MAX_BLANK_LINES} blank lines in a row")
            if self.goaway is None:
                self.goaway = "closing"  # stop reading once the lines of this read are answered

    def _on_stop(self, reason: str) -> None:
        codec = self.state.codec
        if reason == "slow":
            self.state.stats.slow_request_disconnections += 1
            timeout = self.state.settings.request_timeout
            self.error_line = encode_goaway(codec, "request_timeout",
                                            f"request line not completed within {timeout:g}s")
        elif reason == "auth":
            timeout = self.state.settings.auth_timeout
            self.error_line = encode_goaway(codec, "auth_timeout",
                                            f"not authenticated within {timeout:g}s")
        elif reason == "write":
            log.info("connection %s: no write progress for %ss, closing", self.address,
                     self.state.settings.write_timeout)
            self.abort()
        else:
            self.goaway = reason

    def authenticate(self) -> None:
        """AUTH succeeded: switch to the full command table and line limit."""
        self.calls = self.state.calls
        self.buffer.max_line_bytes = self.state.settings.max_line_bytes

    def close_after_replies(self, reason: str, msg: str) -> None:
        """Dispatch no further line, not even one already received: close once the requests answered
        so far are sent, with a going-away line for ``reason`` (the lines never dispatched were not
        processed). Called by a handler (AUTH at its failure limit)."""
        self.error_line = encode_goaway(self.state.codec, reason, msg)
        if self.goaway is None:
            self.goaway = "closing"
        self._stop_reading()

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
        local, calls the clock twice and leaves every rare case (a bad line, a refusal, a handler's
        exception, an oversize reply) to a function of its own, called only when it happens.
        """
        state = self.state
        codec = state.codec
        if line is None:
            return self._line_too_long()
        try:
            req = parse_request(line, codec, self.address, self.received, ServerRequest)
        except Exception as exc:  # ProtocolError, or a parser bug: one 400, never the connection
            return self._bad_line(line, exc)
        self.requests += 1
        cmdid = req.cmdid
        if self.floating and req.id in self.floating.values():  # completion order, an id in flight
            return self._duplicate_id(req)
        call = self.calls.get(cmdid)
        if call is None:
            return self._refuse_unknown(req)
        refusal = state.admit(self, req)  # or admitted, with the watch armed (see ServerState.admit)
        if refusal is not None:
            return self._refuse(req, refusal)
        req.connection = self  # the server's fields (ServerRequest), set once the request may run
        req._slot = None
        req._timer = None
        self.running = req
        clock = state.clock
        started = clock()
        code: int
        try:
            try:
                # Each request runs in a fresh copy of the worker's base context: pipelined requests
                # share this greenlet, and one caller's contextvars must not leak to the next.
                data = state.new_context().run(call, req)
            finally:
                # Before anything that could yield (logging, encoding): once the handler has
                # returned, no handoff and no deadline may land on this greenlet any more.
                if self.running is req:
                    self.running = None
                timer = req._timer
                if timer is not None:  # no deadline or cancel may land from here on
                    req._timer = None  # also tells the deadline callback the handler has returned
                    timer.stop()
                    timer.close()
        except BaseException as exc:  # the handler's error reply; a 500 for anything else, never the connection
            failed = self._handler_raised(req, exc, me)
            if failed is None:
                return False  # this greenlet is done (an inline reader finds the connection closed)
            reply, code = failed
        else:
            try:
                reply = encode_reply(codec, cmdid, data, req.id, req.has_id)
                code = 0
            except Exception as exc:  # anything (a LocalProxy out of context, MemoryError): this request's 500
                reply, code = self._unencodable(req, data, exc)
        slot = req._slot
        if slot is not None:  # handed off while the handler blocked
            return self._finish_handoff(req, slot, reply, code, clock() - started, me)
        if len(reply) > state.settings.max_reply_bytes:
            reply, code = self._reply_too_large(req)
        elapsed = clock() - started
        state.stats.record(cmdid, code, elapsed)
        access_log = state.access_log
        if access_log is not None:
            access_log(self, req, code, elapsed)
        if self.floating and req.id is None:  # id-less, behind requests answered when ready
            self._barrier()
        self.out.append(reply)
        self.queued_bytes += len(reply)
        if self.queued_bytes > FLUSH_BYTES:
            self._flush_or_wait()
        return True

    # -- the rare paths of _dispatch ----------------------------------------------------------------

    def _queue_error(self, line: bytes, rid: Any = None) -> bool:
        """Queue an error reply the dispatcher made (400, 404, 413, a refusal) to a line whose id
        was ``rid``; returns True, as :meth:`_dispatch` does. Counted as replies are: one echoes its
        line's id, which can be as long as the line (1.5 MiB once escaped), and a blocked head must
        not let them pile up. In completion order an id-less one is a barrier, and one carrying the id
        of a floating request (a 400 for a bad line reusing it) must not overtake that request's reply,
        or the two replies with one id could not be told apart (:meth:`_behind_floating`)."""
        floating = self.floating
        if floating and (rid is None or rid in floating.values()) and self._behind_floating(line, rid):
            return True
        self.out.append(line)
        self.queued_bytes += len(line)
        if self.queued_bytes > FLUSH_BYTES:
            self._flush_or_wait()
        return True

    def _line_too_long(self) -> bool:
        """A line LineBuffer cut at its limit: one 413 stating that limit (64 KiB before AUTH, the one
        in force when the line was cut, not necessarily today's)."""
        self.state.stats.protocol_errors += 1
        return self._queue_error(encode_error(self.state.codec, Code.TOO_LARGE,
                                              f"request line longer than {self.buffer.cut_limit} bytes"))

    def _bad_line(self, line: bytes, exc: Exception) -> bool:
        """A line parse_request refused (its 400, with whatever id and cmdid it recovered), or failed
        on (a parser bug: logged, a bare 400); a blank line in a read of long lines is only counted."""
        state = self.state
        if not isinstance(exc, ProtocolError):
            log.error("request line from %s could not be parsed", self.address, exc_info=exc)
            state.stats.protocol_errors += 1
            return self._queue_error(encode_error(state.codec, Code.BAD_REQUEST, "invalid request"))
        if not line.strip(BLANK):  # blank, in a read of long lines (LineBuffer dropped the others)
            state.stats.blank_lines += 1
            return True
        state.stats.protocol_errors += 1
        return self._queue_error(encode_error(state.codec, exc.code, exc.msg, exc.cmdid, exc.id, exc.has_id), exc.id)

    def _duplicate_id(self, req: ServerRequest) -> bool:
        """A request on a completion-order connection whose id is already in flight there: refused
        (400, not run); :meth:`_queue_error` puts it behind the earlier request's reply (its id is
        floating), so the client reads the refusal after the first reply and each stays matchable."""
        state = self.state
        state.stats.protocol_errors += 1
        return self._queue_error(encode_error(state.codec, Code.BAD_REQUEST, "id already in flight on this connection",
                                              req.cmdid, req.id, req.has_id), req.id)

    def _refuse(self, req: ServerRequest, refusal: tuple[int, str]) -> bool:
        """Answer a request ``state.admit`` refused (deadline already passed, in-flight limit)."""
        code, msg = refusal
        self.state.stats.record(req.cmdid, code, 0.0)
        return self._queue_error(encode_error(self.state.codec, code, msg, req.cmdid, req.id, req.has_id), req.id)

    def _handler_raised(self, req: ServerRequest, exc: BaseException, me: Any) -> tuple[bytes, int] | None:
        """The reply and code for a handler that raised ``exc``; ``None`` when nobody is left to answer.

        DeadlineReached is the 504, a HandlerError its own error reply; anything else (sys.exit(),
        an escaped gevent.Timeout, a bug) is logged and answered 500. On a closed connection a
        GreenletExit (a kill by ``Server.close``, re-raised) or RequestCancelled ends the request.
        """
        codec = self.state.codec
        if isinstance(exc, DeadlineReached):
            return encode_error(codec, Code.DEADLINE_EXCEEDED, "deadline exceeded", req.cmdid, req.id,
                                req.has_id), Code.DEADLINE_EXCEEDED
        if isinstance(exc, HandlerError):  # application codes and 400 only; anything else becomes a 500
            if type(exc) is ServerRefusal and req.cmdid in self.state.limited:  # its limiter's 503 (see
                # geventtcp.middleware: the limiter turns one from inside it into a 500): not processed
                return encode_error(codec, exc.code, exc.msg, req.cmdid, req.id, req.has_id), exc.code
            return encode_handler_error(codec, exc, req.cmdid, req.id, req.has_id)
        if self.read_state == CLOSED and isinstance(exc, (GreenletExit, RequestCancelled)):  # nobody to answer
            self._drop_slot(req, me)
            if isinstance(exc, GreenletExit):  # killed by Server.close
                raise exc
            return None
        log.error("handler for cmdid %d raised (peer %s, id %r)", req.cmdid, self.address, req.id, exc_info=exc)
        return encode_error(codec, Code.INTERNAL, "internal error", req.cmdid, req.id, req.has_id), Code.INTERNAL

    def _unencodable(self, req: ServerRequest, data: Any, exc: Exception) -> tuple[bytes, int]:
        """The reply to a result ``encode_reply`` failed on: a seed handler's ``self.res`` line
        (:class:`~geventtcp.handler.SeedReply`, which has no JSON form on purpose), else a 500."""
        if type(data) is SeedReply:
            return self._seed_reply(req, data.text)
        return self._not_serializable(req, exc), Code.INTERNAL

    def _seed_reply(self, req: ServerRequest, text: str | bytes) -> tuple[bytes, int]:
        """The reply to a seed handler's ``self.res`` line (:func:`encode_seed_reply`); a 500 if it has no JSON form."""
        try:
            return encode_seed_reply(self.state.codec, text, req.cmdid, req.id, req.has_id)
        except Exception as exc:  # a str with a lone surrogate, as data: this request's 500, never the connection
            return self._not_serializable(req, exc), Code.INTERNAL

    def _reply_too_large(self, req: ServerRequest) -> tuple[bytes, int]:
        """A reply longer than ``max_reply_bytes`` is replaced by a 413 (the request did run)."""
        return encode_error(self.state.codec, Code.TOO_LARGE, "reply too large", req.cmdid, req.id,
                            req.has_id), Code.TOO_LARGE

    def _not_serializable(self, req: ServerRequest, exc: BaseException) -> bytes:
        log.error("result of cmdid %d is not serializable: %r", req.cmdid, exc)
        return encode_error(self.state.codec, Code.INTERNAL, "result not serializable", req.cmdid, req.id,
                            req.has_id)

    def _flush_or_wait(self) -> None:
        """Inline replies passed FLUSH_BYTES: send them; if they stay queued (behind a blocked
        request, or another greenlet is sending), stop reading until the queue drains."""
        self._flush()
        if self.queued_bytes > MAX_QUEUED_BYTES and self.read_state != CLOSED:
            self._wait_drained()

    def _finish_handoff(self, req: ServerRequest, slot: _Slot, reply: bytes, code: int, elapsed: float,
                        me: Any) -> bool:
        """A handed-off request is done: fill its slot and release its counts whatever fails on the
        way, then send what is ready. Returns False: this greenlet no longer reads."""
        if slot.data is not None:  # answered 504 at its deadline; the handler had swallowed DeadlineReached
            self._deadline_answered(req, me, elapsed)
            return False
        state = self.state
        try:
            if len(reply) > state.settings.max_reply_bytes:
                reply, code = self._reply_too_large(req)
            state.stats.record(req.cmdid, code, elapsed)
            access_log = state.access_log
            if access_log is not None:
                access_log(self, req, code, elapsed)
        finally:
            self._fill(slot, reply)
            self._drop_slot(req, me)
        if self.read_state != CLOSED:
            self._flush()
            self._maybe_close()
        return False

    # -- completion order (protocol 1.1) ------------------------------------------------------------

    def _fill(self, slot: _Slot, reply: bytes) -> None:
        """A handed-off request's reply is ready: into its slot in ``out`` (in request order), or, a
        floating slot (unordered connection, the request carried an id), at the end of ``out`` (just
        ahead of its gate, if an id-less reply was queued after it), to go out with the next send.
        Counted in ``queued_bytes`` either way (the byte bound)."""
        slot.data = reply
        self.queued_bytes += len(reply)
        floating = self.floating
        if floating and slot in floating:
            del floating[slot]
            gate = slot.gate
            out = self.out
            at = len(out) if gate is None else out.index(gate)
            out.insert(at, reply)
            if self.held and slot in self.held:
                self._release_held(slot, at + 1)
            if gate is None:
                return
            gate.pending -= 1
            if not gate.pending:
                gate.data = b""  # every request read before the id-less reply is answered: open

    def _barrier(self) -> None:
        """An id-less reply (or slot) is about to be queued on an unordered connection: every request
        read before it must be answered first, so a :class:`_Gate` goes into ``out`` ahead of it
        (anything queued later goes behind it) and opens once the floating requests not yet behind an
        earlier gate are answered; their replies still leave as each is ready, in front of the gate
        (and their ids stay in ``floating`` until then). A client can then match an id-less reply to
        its oldest unanswered request, as in request order."""
        floating = self.floating
        assert floating is not None
        gate: _Gate | None = None
        for slot in floating:
            if slot.gate is None:  # those behind an earlier gate are ahead of it in ``out`` already
                if gate is None:
                    gate = _Gate()
                slot.gate = gate
                gate.pending += 1
        if gate is not None:
            self.out.append(gate)
            self.open_slots += 1

    def _behind_floating(self, line: bytes, rid: Any) -> bool:
        """Before an error reply ``line`` is queued on an unordered connection, with ``rid`` its id:
        ``None`` (id-less) makes it a barrier; the id of a floating request must follow only that
        request's reply, not hold the replies read after it behind every request in flight. Returns
        True when the line is held (queued right after that reply, by :meth:`_fill`), else the caller
        appends it to ``out``: behind the gate of a barrier read since that request (its reply goes in
        front of the gate), or, past :data:`MAX_HELD_REPLIES` held (a peer reusing ids on purpose),
        behind a barrier, which the output queue's bounds cover."""
        if rid is None:
            self._barrier()
            return False
        floating = self.floating
        assert floating is not None
        slot = next(s for s, i in floating.items() if i == rid)
        if slot.gate is not None:
            return False
        held = self.held
        if held is None:
            held = self.held = {}
        if sum(map(len, held.values())) >= MAX_HELD_REPLIES:
            self._barrier()
            return False
        held.setdefault(slot, []).append(line)
        return True

    def _release_held(self, slot: _Slot, at: int) -> None:
        """The reply of floating ``slot`` went into ``out`` before index ``at``: the refusals held for
        its id go right after it, counted in ``queued_bytes`` from now on."""
        assert self.held is not None
        lines = self.held.pop(slot)
        self.out[at:at] = lines
        self.queued_bytes += sum(map(len, lines))

    def _drop_slot(self, req: ServerRequest, me: Any) -> None:
        """A handed-off request is over: it no longer counts in flight (its slot stays in ``out``).

        Only once: the counts of a request answered at its deadline, or of a connection aborted,
        were released then (``me`` left :attr:`handlers`).
        """
        if req._slot is not None:
            if me in self.handlers:
                del self.handlers[me]
                self.inflight -= 1
                self.state.inflight -= 1
            elif self.orphans:  # its connection was aborted meanwhile: nothing left for Server.close to kill
                self.orphans.pop(me, None)

    def _refuse_unknown(self, req: ServerRequest) -> bool:
        """Answer a cmdid this connection may not call: 401 before AUTH, else 404."""
        state = self.state
        if self.calls is not state.calls:
            code, msg = Code.UNAUTHENTICATED, "authentication required"
        else:
            code, msg = Code.UNKNOWN_COMMAND, f"unknown cmdid {req.cmdid}"
        state.stats.unknown_commands += 1
        return self._queue_error(encode_error(state.codec, code, msg, req.cmdid, req.id, req.has_id), req.id)

    def hand_off(self) -> None:
        """Runs in the hub once the reader yielded (the state's watch pass, ``ServerState.watch_all``):
        if it is inside a handler, give the reader role to another greenlet."""
        self.watch_armed = False
        req = self.running
        if req is None or self.read_state == CLOSED:
            return
        self.running = None
        state = self.state
        slot = _Slot()
        req._slot = slot
        if self.unordered and req.id is not None:  # its reply goes out when ready (_fill)
            floating = self.floating
            if floating is None:
                floating = self.floating = {}
            floating[slot] = req.id
        else:
            if self.floating:
                self._barrier()
            self.out.append(slot)
            self.open_slots += 1
        self.inflight += 1
        state.inflight += 1
        if req.cmdid >= 0:  # an application command that blocks: refused at a full limit from now on
            state.blocking.add(req.cmdid)
        deadline = state.deadline_for(req)
        if deadline is not None:
            now = state.clock()
            timer = state.loop.timer(max(0.0, deadline - now))
            timer.start(self._on_deadline, req, self.reader, now)
            req._timer = timer
        elif req.cmdid in state.cancel_on_disconnect:
            req._timer = state.loop.timer(0)  # never started: marks "handler still running" for a cancel
        self.handlers[self.reader] = req
        self.reader = None
        self.state.readers.run(self._read_loop)

    def _on_deadline(self, req: ServerRequest, glet: Any, handed_off: float) -> None:
        """Hub-side, at a handed-off request's deadline: its reply becomes the 504 now, whatever the
        handler does with the DeadlineReached thrown into it.

        A handler that catches BaseException would otherwise go on and answer whenever it likes.
        Its slot is filled before the throw, so a result it returns is discarded; if it is still
        running after the throw, a reader greenlet sends the 504 and releases the request's counts
        (the handler runs on unaccounted, to its end, and its result is dropped with a warning).
        """
        slot = req._slot
        if slot is None or slot.data is not None:
            return
        if self.read_state != CLOSED:
            self._fill(slot, encode_error(self.state.codec, Code.DEADLINE_EXCEEDED, "deadline exceeded", req.cmdid,
                                          req.id, req.has_id))
        glet.throw(DeadlineReached)
        if req._timer is not None and self.read_state != CLOSED:  # it swallowed the exception and runs on
            self.state.readers.run(self._deadline_answered, req, glet, self.state.clock() - handed_off)

    def _deadline_answered(self, req: ServerRequest, glet: Any, elapsed: float) -> None:
        """Count and send the 504 of a request answered at its deadline, once: from the handler's
        own completion, or (it swallowed DeadlineReached) from a reader greenlet at the deadline."""
        if glet not in self.handlers:  # the handler finishing after its 504 was sent
            if self.orphans:
                self.orphans.pop(glet, None)
            if self.read_state != CLOSED:
                log.warning("handler for cmdid %d returned after its deadline (it caught DeadlineReached); "
                            "its result was dropped (peer %s, id %r)", req.cmdid, self.address, req.id)
            return
        self._drop_slot(req, glet)
        state = self.state
        state.stats.record(req.cmdid, Code.DEADLINE_EXCEEDED, elapsed)
        access_log = state.access_log
        if access_log is not None:
            access_log(self, req, Code.DEADLINE_EXCEEDED, elapsed)
        if self.read_state != CLOSED:
            self._flush()
            self._maybe_close()

    # -- writing ---------------------------------------------------------------------------------

    def _take_ready(self) -> bytes:
        """Take the ready replies at the head of ``out`` (up to the first unfilled slot), at most about
        FLUSH_BYTES of them joined; a larger reply goes alone, without a copy."""
        out = self.out
        ready: list[bytes] = []
        size = 0
        taken = 0
        slots = 0
        for item in out:
            if type(item) is bytes:
                data = item
            else:
                data = item.data
                if data is None:
                    break
            if size + len(data) > FLUSH_BYTES and size:  # ``size``, not ``ready``: an open gate is b""
                break
            if data is not item:
                slots += 1
            ready.append(data)
            size += len(data)
            taken += 1
        del out[:taken]
        self.open_slots -= slots
        # max(): the final line (goaway or error) is queued without being counted
        self.queued_bytes = max(0, self.queued_bytes - size) if out else 0
        return ready[0] if len(ready) == 1 else b"".join(ready)

    def _flush(self) -> None:
        """Send every reply that is ready, in order; one greenlet at a time does the sending."""
        if self.flushing or not self.out:
            return
        self.flushing = True
        raw_send = self._raw_send
        try:
            while self.out and self.read_state != CLOSED:
                if self.open_slots or self.queued_bytes > FLUSH_BYTES:
                    data = self._take_ready()
                    if not data:
                        break
                else:  # a few ready replies (no handoff pending): take them all
                    out = self.out
                    data = out[0] if len(out) == 1 else b"".join(out)
                    self.out = []
                    self.queued_bytes = 0
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
            if drained is not None and len(self.out) <= MAX_QUEUED_REPLIES // 2 \
                    and self.queued_bytes <= MAX_QUEUED_BYTES // 2:
                drained.set()
        if self.close_pending:
            self.close_pending = False
            self._maybe_close()

    def _send_rest(self, data: bytes, sent: int) -> None:
        """Send ``data`` from byte ``sent`` on, waiting for the socket (the watchdog's write timeout
        interrupts a peer that stops reading: ``Stop`` or ``OSError``, which the caller handles)."""
        self.writer = getcurrent()
        self.write_tick = self.state.tick
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
        if self.read_state != DONE or self.inflight:
            return
        if self.flushing:
            self.close_pending = True
            return
        final = self.error_line
        if final is None and self.goaway is not None:
            final = encode_goaway(self.state.codec, self.goaway)
        if final is not None:
            self.out.append(final)
        self._flush()
        if self.read_state == CLOSED:
            return
        self.read_state = CLOSED  # DONE -> CLOSED
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

    def abort(self, cancel: bool = True) -> None:
        """Close at once: replies not yet sent are dropped (the peer is gone or too slow).

        Running handlers now see ``request.cancelled``; with ``cancel``, those registered with
        ``cancel_on_disconnect`` also get :class:`RequestCancelled` (``Server.close`` kills instead).
        Handlers still running for it no longer count in flight: their results have nowhere to go,
        and a handler that never ends must not hold the worker's ``max_inflight`` forever.
        """
        if self.read_state == PARKED:  # closing a socket under a started watcher would throw into its callback's owner
            self._read_watcher.stop()
        self.read_state = CLOSED  # any -> CLOSED
        if cancel and self.state.cancel_on_disconnect and (self.handlers or self.running is not None):
            self._cancel_handlers()  # before the handlers are forgotten below
        if self.inflight:
            self.state.inflight -= self.inflight
            self.inflight = 0
            self.orphans = dict(self.handlers)  # they run on; Server.close still kills them
            self.handlers.clear()
        if self.orphans or self.running is not None:
            self.state.orphaned_by(self)
        if self.drained is not None:
            self.drained.set()  # a reader waiting for the output queue must see the close
        self._release()

    def _cancel_handlers(self) -> None:
        """Schedule :class:`RequestCancelled` for each running handler that asked for it."""
        wanted = self.state.cancel_on_disconnect
        run = self.state.loop.run_callback
        for glet, req in list(self.handlers.items()):
            if req.cmdid in wanted:
                run(self._throw_cancel, glet, req)
        inline = self.running  # an inline handler that yielded before its handoff ran
        if inline is not None and self.reader is not None and inline.cmdid in wanted:
            run(self._throw_cancel, self.reader, inline)

    def _throw_cancel(self, glet: Any, req: ServerRequest) -> None:
        """Hub callback: throw into ``glet`` only if it is still inside ``req``'s handler (a handed-off
        handler's ``_timer`` is cleared as it returns; an inline one's ``running``), never into a
        greenlet that has moved on to other work."""
        handed_off = req._slot is not None and req._timer is not None  # abort() forgot ``handlers``
        if handed_off or (self.running is req and self.reader is glet):
            glet.throw(RequestCancelled)

    def _release(self) -> None:
        try:
            self.sock.close()
        finally:
            self.state.forget(self)

    def interrupt(self, reason: str) -> None:
        """Hub-side: end a wait of this connection's greenlets for ``reason``.

        ``slow`` and the goaway reasons stop a reader parked in ``recv`` (a goaway only when no
        request line is half received); ``write`` stops a writer stuck on a peer that reads nothing;
        ``auth`` does the one or the other (a connection busy otherwise is asked again next tick).
        Call it from a hub callback (``loop.run_callback``) so that the state checked here is the
        state the greenlet is in when the exception lands.
        """
        read_state = self.read_state
        if read_state == CLOSED:
            return
        if reason == "auth" and self.calls is self.state.calls:
            return  # AUTH succeeded after the sweep saw it missing (read in the same loop turn)
        if reason == "write":
            if self.writer is not None:
                self.state.stats.write_timeout_disconnections += 1
                self.writer.throw(Stop(reason))
            return
        if reason == "auth" and self.writer is not None:  # not authenticated in time and reading slowly:
            self.writer.throw(Stop(reason))  # no 401 line can get through a full send queue: drop
            return
        fatal = reason in ("slow", "auth")  # an error line and close, even with half a line received
        if not fatal and self.goaway is None:
            self.goaway = reason
        reader = self.reader
        if (read_state == PARKED or read_state == RECEIVING) and (fatal or not self.buffer.pending):
            if read_state == PARKED:
                self._unpark(reason)
            elif reader is not None:
                reader.throw(Stop(reason))


# While ``_dispatch`` runs, its ``req`` is the request being served: log records written meanwhile (in
# the handler, inline or handed off) carry its cmdid and request id (``geventtcp.log.current_request``).
request_frame(Connection._dispatch.__code__, "req")


def encode_handler_error(codec: Codec, exc: HandlerError, cmdid: Any, id: Any, has_id: bool) -> tuple[bytes, int]:
    """The reply line to a :class:`HandlerError` a handler raised, and its code (the error path only).

    Its code and message, plus ``"details"`` when it has some. A 500 ``internal error`` (the
    request's id kept) instead when the code is not one a handler may answer with (changed after
    the error was built, or a subclass's own) or the details have no strict JSON form (a lone
    surrogate included, which the client would refuse): no handler reply reads as a transport code.
    """
    code: Any = getattr(exc, "code", None)  # a subclass may skip HandlerError.__init__: then a 500
    if type(exc) is ServerRefusal and type(cmdid) is int and cmdid < 0:  # a built-in's own code (AUTH's 401)
        return encode_error(codec, code, exc.msg, cmdid, id, has_id), int(code)
    if (type(code) is not int and not isinstance(code, Code)) or code not in HANDLER_CODES:
        log.error(
            "handler for cmdid %r raised %s with code %r, which handlers cannot answer with: sent a 500",
            cmdid, type(exc).__name__, code)
        return encode_error(codec, Code.INTERNAL, "internal error", cmdid, id, has_id), Code.INTERNAL
    line = encode_error(codec, code, _sendable_msg(getattr(exc, "msg", "")), cmdid, id, has_id)
    details = getattr(exc, "details", None)
    if details is None:
        return line, int(code)
    try:
        body = codec.dumps(details)
        if 92 in body:  # an escape: maybe of a lone surrogate (also inside an ``_asdict`` object)
            codec.check_surrogates(body, details)
    except Exception as err:  # anything (an ``_asdict`` that raises): this request's 500, never the connection
        log.error(
            "details of the %s raised by the handler for cmdid %r are not serializable: %r: sent a 500",
            type(exc).__name__, cmdid, err)
        return encode_error(codec, Code.INTERNAL, "error details not serializable", cmdid, id, has_id), Code.INTERNAL
    return b'%b,"details":%b}\n' % (line[:-2], body), int(code)


_JSON_SPACE = BLANK + b"\n"
#: cmdids whose handler's ``self.res`` looked like a reply line but was not one: warned about once each.
_WARNED_SEED_TEXT: set[Any] = set()


def encode_seed_reply(codec: Codec, text: str | bytes, cmdid: Any, id: Any, has_id: bool) -> tuple[bytes, int]:
    """The reply line (and its code) for the text a seed handler left in ``self.res`` (see
    :class:`geventtcp.handler.SeedReply`, the rule): a JSON object with an integer ``code`` is the
    reply itself, re-encoded on one line with the request's ``id``; anything else is ``data``.
    Raises ``ValueError``/``UnicodeError`` only for text that has no JSON form as data either.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else text
    try:
        reply = codec.loads(raw.strip(_JSON_SPACE))  # strict: one value (duplicate keys refused)
    except Exception:  # noqa: BLE001 - not JSON: then it is data, as any res is
        reply = None
    code = reply.get("code") if type(reply) is dict else None
    if type(code) is not int:
        if raw.lstrip(_JSON_SPACE)[:1] == b"{" and cmdid not in _WARNED_SEED_TEXT:
            _WARNED_SEED_TEXT.add(cmdid)
            log.warning("self.res of the handler for cmdid %r looks like a reply line but is not a JSON object "
                        "with an integer code: sent as the reply's data", cmdid)
        return encode_reply(codec, cmdid, text, id, has_id), 0  # exactly as before seed replies were read
    if code != 0 and code not in HANDLER_CODES:  # as a HandlerError's code: never a transport meaning
        log.error("handler for cmdid %r set a reply line with code %r, which handlers cannot answer with: sent a 500",
                  cmdid, code)
        return encode_error(codec, Code.INTERNAL, "internal error", cmdid, id, has_id), Code.INTERNAL
    reply.pop("id", None)  # the request's id or none, never the handler's: clients match replies by it
    if has_id:
        reply["id"] = id
    reply.setdefault("cmdid", cmdid)
    line = codec.dumps(reply) + b"\n"
    if 92 in line:  # as encode_reply: an escape may be a lone surrogate's, which clients refuse
        codec.check_surrogates(line, reply)
    return line, code


def _sendable_msg(msg: Any) -> str:
    """A handler's ``msg`` as text every peer can read: ``str()`` of anything else than a str (an
    unencodable msg would lose the connection, and every request on it; a placeholder if ``str()``
    raises), and a lone surrogate (``os.fsdecode()`` of an undecodable file name) as its
    ``\\udXXX`` text (the client refuses a line that escapes one, and fails the whole connection)."""
    try:
        text = msg if type(msg) is str else str(msg)
    except Exception:  # the reply path must not raise: that would lose the connection
        text = f"<unprintable {type(msg).__name__}>"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
