"""One client connection: many callers multiplexed over one socket, each reply matched to its caller by id."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

from geventtcp.client.call import Call, request_line
from geventtcp.client.concurrency import World, fork_generation, real_lock
from geventtcp.client.io import shutdown
from geventtcp.client.replycodec import ReplyCodec, answers_oldest, unsolicited
from geventtcp.codec import Codec
from geventtcp.errors import CallTimeout, MaybeExecuted, NotSent, ProtocolError, TransportError
from geventtcp.protocol import UNORDERED, Builtin, LineBuffer, accepted_features, hello_params

__all__ = ["ClientConnection", "STUCK_GRACE"]

log = logging.getLogger("geventtcp.client")

#: Seconds past its deadline a request may stay unanswered before the connection is presumed dead:
#: the server is told the deadline (``timeout_ms``) and answers by then, so silence means a black hole.
STUCK_GRACE = 1.0
#: Seconds after which the oldest unanswered request marks a connection as stalled. In request order
#: (a server before protocol 1.1) everything queued behind a slow request waits for it; the pool
#: opens another connection (within its bound) rather than queue more behind a stalled one.
STALL_AFTER = 0.05


class ClientConnection:
    """A connected socket shared by any number of callers of one world (threads, or one gevent hub).

    Requests carry ids from a per-connection counter. There is no reader thread or greenlet: a caller
    waiting for its reply that finds nobody reading becomes the reader (leader/follower). It reads
    lines, hands each reply to the caller its id names, and when its own reply has come passes the
    reader role to a caller still waiting. A caller alone therefore just writes and reads the socket.

    Failure behaviour: a caller that times out or is cancelled (``gevent.Timeout``, ``kill``,
    ``KeyboardInterrupt``) while waiting leaves its request *abandoned*: the reply is read later and
    dropped, never given to another caller.

    Protocol 1.1: :meth:`hello` (sent by the pool first on every new connection, without waiting for
    its reply) asks for replies in completion order; when the reply grants ``unordered``,
    :attr:`unordered` turns true and the pool no longer treats a slow request as stalling the
    connection. Matching is by id in both modes. An old server answers the HELLO 404 and the
    connection stays in request order. In both modes an id-less reply comes after the replies of
    every earlier request and before those of every later one, so an id-less 400 or 413
    (the server could not read that line's id) is the oldest unanswered request's reply
    (:func:`~geventtcp.client.replycodec.answers_oldest`): one caller's bad line fails that caller only.
    Anything that breaks the byte stream (a write that did not finish, a read error, EOF, an
    unreadable line, a reply for an id never sent, any other error line without id, which is the
    server speaking for the connection, never a caller's reply: see
    :func:`~geventtcp.client.replycodec.unsolicited`) closes the connection and fails each request still
    waiting: :class:`NotSent` if its line was not written, the server's ``goaway`` (or a 503 refusal)
    gives :class:`Unprocessed`, otherwise :class:`MaybeExecuted`.

    Who closes what: the pool calls :meth:`close`; the connection also closes itself on the failures
    above. The socket is closed once no caller is inside a read or write on it; after ``fork()`` the
    child never touches the parent's socket beyond dropping its own descriptor.
    """

    def __init__(self, sock: Any, address: str, world: World, codec: Codec, max_reply_bytes: int) -> None:
        self.sock = sock
        self.io = world.io(sock)
        self.address = address
        self.world = world
        self.codec = ReplyCodec(codec)
        self.state = real_lock()  # guards the fields below; never held across I/O
        self.wlock = world.lock()  # one writer at a time, so request lines never interleave
        # ``wlock.acquire(False)`` as an endless iterator, for a signal-safe take (see :meth:`_write`).
        self._try_wlock: Iterator[bool] = iter(functools.partial(self.wlock.acquire, False), None)
        self.calls: dict[int, Call] = {}  # in write order: the first is the one an id-less reply answers
        self.orphans = 0  # calls in ``calls`` nobody waits on (send(), timed out, cancelled)
        self.reading = False
        self.writing = False
        self.closed = False
        self.sock_closed = False
        self.reason = ""
        self.buffer = LineBuffer(max_reply_bytes)
        self.generation = fork_generation()
        self.created = self.last_active = self.last_reply = time.monotonic()
        self._ids = itertools.count(1)
        self.unordered = False  # the server answers in completion order (HELLO granted it)
        self.hello_id: int | None = None  # the HELLO's id while its reply is awaited
        # Which server process answers here, and how many share its listener (from HELLO; unknown: None, 1),
        # so the pool can spread its connections over the workers; ``retiring``: the pool sends no new call.
        self.server_pid: int | None = None
        self.server_workers = 1
        self.retiring = False

    def __repr__(self) -> str:
        state = f"closed: {self.reason}" if self.closed else f"{len(self.calls)} in flight"
        return f"<ClientConnection {self.address} {self.world.name} {state}>"

    @property
    def inflight(self) -> int:
        return len(self.calls)

    # -- the request path ------------------------------------------------------------------------

    def request(self, cmdid: int, params: Any, deadline: float, detached: bool = False,
                meta: bytes = b"") -> dict[str, Any] | None:
        """Send one request and return its reply (a dict with ``code``), or ``None`` when ``detached``.

        Raises :class:`NotSent`, :class:`Unprocessed`, :class:`MaybeExecuted` or :class:`CallTimeout`
        as described on the class; ``TypeError``/``ValueError`` if ``params`` has no JSON form.
        A ``detached`` request is written and its reply dropped when it comes. ``meta`` is the
        encoded ``meta`` field of the line (see :func:`~geventtcp.client.call.request_line`).
        """
        if detached:
            self._send(cmdid, params, deadline, meta)
            return None
        call = Call(0, deadline, False)
        try:
            if self._write(cmdid, params, call, deadline, True, meta):
                self._lead(call, deadline)  # nobody was reading: go straight to reading (the lone caller)
            if not call.done:  # ``done`` is set last, after ``reply``/``error``: true means both are final
                self._wait(call, deadline)
        except BaseException:
            # A signal's exception (Ctrl-C) at a check between taking the reader role (in _write or
            # _wait) and entering _lead, whose ``finally`` hands it on: the reply will come, and
            # nobody else may read until the role is handed on.
            if call.leading:
                call.leading = False
                self._abandon(call)
                self._release_reader()
            raise
        if call.error is not None:
            raise call.error
        return call.reply

    def hello(self, deadline: float) -> None:
        """Ask for protocol 1.1's completion order: write a HELLO whose reply nobody waits for (the next
        reader handles it, :meth:`_on_hello`), so the first call pays no extra round trip. Raises
        what writing a request raises (:class:`NotSent`); the connection is then unusable anyway."""
        call = Call(0, deadline, True)
        self._write(Builtin.HELLO, hello_params(), call, deadline)
        self.hello_id = call.id

    def _on_hello(self, reply: dict[str, Any]) -> None:
        """The HELLO's reply (read under ``state``): completion order from the next request on, or,
        from a server before 1.1 (404) or one that declines, request order as before."""
        self.hello_id = None
        self.unordered = UNORDERED in accepted_features(reply)
        data = reply.get("data")
        if type(data) is dict:
            pid, workers = data.get("pid"), data.get("workers")
            self.server_pid = pid if type(pid) is int else None
            self.server_workers = workers if type(workers) is int and workers > 0 else 1
        if reply["code"]:
            log.debug("%s does not speak protocol 1.1 ([%s] %s): replies in request order", self.address,
                      reply["code"], reply.get("msg"))

    def _send(self, cmdid: int, params: Any, deadline: float, meta: bytes = b"") -> None:
        """The ``detached`` request: written whole when this returns, its reply dropped when it comes."""
        self._write(cmdid, params, Call(0, deadline, True), deadline, False, meta)
        self.poll()

    def _write(self, cmdid: int, params: Any, call: Call, deadline: float, claim: bool = False,
               meta: bytes = b"") -> bool:
        """Number, encode and write the request; ids are taken under the write lock so that the order
        of ``calls`` is the order of the lines on the wire (the order of the server's replies).

        With ``claim``, also take the reader role if it is free; True when it was taken (and the
        line written): the caller must then :meth:`_lead`, which hands the role on."""
        wlock = self.wlock
        got = False  # the write lock is ours
        try:
            # The lock is taken through an iterator: FOR_ITER stores ``acquire``'s result before the
            # interpreter next checks for signals, which it does at the end of a call, where a Ctrl-C
            # handled after ``acquire`` returned True left the lock held for good (and every later
            # call on the connection waiting to write until its deadline).
            for got in self._try_wlock:  # noqa: B007 (read after the loop) acquire(False): free is the common case
                break
            if not got:
                remaining = deadline - time.monotonic()
                if remaining > 0.0:
                    for got in iter(functools.partial(wlock.acquire, True, remaining), None):  # noqa: B007
                        break
                if not got:
                    raise NotSent(f"timed out waiting to write to {self.address}")
            line = request_line(self.codec, cmdid, params, call, next(self._ids), time.monotonic(), self.address,
                                meta)
            rid = call.id
            led = False
            try:
                # _register_locked, inline: this is every call's path. ``with``, not acquire() then try:
                # the interpreter checks for signals after a call returns, and a KeyboardInterrupt raised
                # there would leave the lock held for good; entering ``with`` has no such check. Its
                # exit does: an exception there finds the call registered, and the handlers below.
                with self.state:
                    if self.closed:
                        raise NotSent(f"connection to {self.address} closed: {self.reason}")
                    self.calls[rid] = call
                    if call.abandoned:
                        self.orphans += 1
                    self.writing = True
                    led = claim and not self.reading
                    if led:
                        self.reading = True
                self.io.send_all(line, deadline)
            except NotSent:  # closed before the call was registered: nothing to undo
                raise
            except OSError as exc:  # timeouts too: the line did not go out whole, and closing drops it
                self._forget(call)
                self._fail(f"write failed: {exc}")
                if led:
                    self._release_reader()
                raise NotSent(f"request to {self.address} not sent: {exc}") from None
            except BaseException:
                # Interrupted: whether the last byte left is unknown, so the stream cannot be trusted.
                self._forget(call)
                self._fail("interrupted while writing")
                if led:
                    self._release_reader()
                raise
            # Lock-free stores (the GIL orders them): a concurrent _fail_locked saw ``written`` false
            # and left the call to us, or true and failed it; either way ``closed`` is seen below,
            # which also closes the socket it left open for us (``writing``).
            call.written = True
            self.writing = False
            if self.closed:  # failed by a reader while we wrote: the line is out, its reply is not
                with self.state:
                    self.calls.pop(rid, None)
                    if led:
                        self.reading = False
                    self._close_socket_if_unused()
                if not call.done:
                    raise MaybeExecuted(f"{self.address}: {self.reason}")
                return False  # its reply came just before the close; the reader role is given up
            self.last_active = call.sent
            call.leading = led  # from here the reader role is the caller's (see request)
            return led
        finally:
            if got:
                if self.writing:  # only on the failure paths above
                    with self.state:
                        self.writing = False
                        self._close_socket_if_unused()
                wlock.release()

    def _register_locked(self, call: Call) -> None:
        """Enter a numbered call in ``calls`` (under ``state``); NotSent if the connection closed.
        (:meth:`_write` does the same inline, being every call's path.)"""
        if self.closed:
            raise NotSent(f"connection to {self.address} closed: {self.reason}")
        self.calls[call.id] = call
        self.orphans += call.abandoned

    def _wait(self, call: Call, deadline: float) -> None:
        """Return once ``call`` is done (reply or error); raise CallTimeout at the deadline."""
        state = self.state
        while True:
            with state:
                if call.done:
                    return
                if self.closed:  # cannot happen to a written call, but never spin on it
                    call.error = MaybeExecuted(f"{self.address}: {self.reason}")
                    return
                lead = not self.reading
                if lead:
                    self.reading = call.leading = True  # the role is the caller's until _lead's (see request)
                elif call.signal is None:
                    call.signal = self.world.signal()
            if lead:
                self._lead(call, deadline)
                continue
            remaining = deadline - time.monotonic()
            try:
                woken = call.signal.acquire(True, remaining) if remaining > 0 else False
            except BaseException:
                self._abandon(call)
                with state:  # the role may have been handed to us just before: pass it on
                    if not self.reading and not self.closed:
                        self._hand_on_locked()
                raise
            if woken and call.done:  # the usual wake-up: the reply came (``done`` is set last)
                return
            with state:
                if woken or call.signaled:
                    if not woken:
                        call.signal.acquire(False)  # the wake-up raced the timeout: consume it
                    call.signaled = False
                    continue
                if call.done:
                    return
                call.abandoned = True
                self.orphans += 1
            raise CallTimeout(f"no reply from {self.address} within the timeout")

    def _lead(self, call: Call, deadline: float) -> None:
        """Read as the reader until ``call`` is done, then hand the role on.

        The lone caller's shortcut: a read that is exactly one line and ``call``'s own success reply
        (:meth:`ReplyCodec.own_reply`; not for a caller that waited on a signal before leading, nor
        after a partial line or with a line over the limit) completes ``call`` straight away, past
        the line buffer and :meth:`_on_line`, exactly as they would; any other read goes to them
        unchanged. The call is taken out of ``calls`` without the lock: the pop is atomic (the GIL)
        and, as we hold the reader role, only :meth:`_fail_locked` can race it (and the checks that
        read the oldest call, :meth:`_oldest_locked`, which start again). Popped first, the
        call is ours to complete; or ``calls`` was emptied first, and :meth:`_on_line` does what is
        due; or the pop fell between that method's snapshot of ``calls`` and its clear: then it
        fails the call after we complete it, and the caller gets the MaybeExecuted it gets when the
        close comes first (the outcome of a legal order, never a reply lost silently).
        """
        call.leading = False  # the role is this frame's now: its ``finally`` hands it on (no check before the try)
        in_io = False
        try:
            io = self.io
            buffer = self.buffer
            while not call.done and not self.closed:
                in_io = True
                data = io.recv(deadline)
                in_io = False
                if self.closed:  # failed meanwhile by another thread: these bytes are not ours to parse
                    break
                if not data:
                    self._fail("server closed the connection")
                    break
                reply = None
                if not buffer.incomplete and len(data) <= buffer.max_line_bytes and call.signal is None:
                    reply = self.codec.own_reply(data, call.cmdid, call.id)
                if reply is not None and self.calls.pop(call.id, None) is not None:
                    call.reply = reply
                    call.done = True
                else:
                    for line in buffer.feed(data):
                        self._on_line(line)
                        if self.closed:
                            break
                self.last_reply = time.monotonic()
            self.last_active = self.last_reply
        except TimeoutError as exc:
            if exc.errno is not None:  # the kernel's ETIMEDOUT (TCP gave up on the peer), not our deadline
                self._fail(f"read failed: {exc}")
            elif self._abandon(call):
                raise CallTimeout(f"no reply from {self.address} within the timeout") from None
        except OSError as exc:
            self._fail(f"read failed: {exc}")
        except BaseException:
            # Cancelled while waiting in recv: no byte was taken from the stream. But a signal's
            # exception right after a read returned (the I/O's ``taking``) carries the bytes away.
            if in_io and not getattr(self.io, "taking", False):
                self._abandon(call)
            else:
                self._fail("interrupted while reading")
            raise
        finally:
            self.reading = False  # _release_reader, inline: see there
            if self.calls or self.closed:
                self._hand_on()

    def _release_reader(self) -> None:
        # Only the role's holder clears ``reading`` (others set it under ``state`` when false): no
        # lock needed. With no call to hand the role to, that is all (a later caller, registering
        # under ``state``, sees it false and leads); a call present takes the locked path.
        self.reading = False
        if self.calls or self.closed:
            self._hand_on()

    def _hand_on(self) -> None:
        """After ``reading`` was cleared: close the socket if the connection closed meanwhile, or wake a
        caller still waiting to take the reader role (unless a caller took it meanwhile)."""
        with self.state:
            if self.closed:
                self._close_socket_if_unused()
                return
            if self.reading:  # taken meanwhile (after the store above) by a caller that hands it on itself
                return
            self._hand_on_locked()

    def _hand_on_locked(self) -> None:
        """Wake one caller still waiting, to take the free reader role (holds ``state``)."""
        for other in self.calls.values():
            if other.signal is not None and not other.signaled and not other.done and not other.abandoned:
                other.signaled = True
                other.signal.release()
                break

    def _abandon(self, call: Call) -> bool:
        """Give up waiting on ``call``; True unless it was completed meanwhile."""
        with self.state:
            if call.done:
                return False
            if call.written:
                call.abandoned = True  # its reply will still come, and be dropped
                self.orphans += 1
            else:
                self.calls.pop(call.id, None)
            return True

    def _forget(self, call: Call) -> None:
        with self.state:
            self.calls.pop(call.id, None)

    # -- replies ---------------------------------------------------------------------------------

    def _on_line(self, line: bytes | None) -> None:
        if line is None:
            self._fail("reply line too long")
            return
        if not line or line.isspace():
            return
        try:
            reply = self.codec.reply(line)
        except ProtocolError as exc:
            self._fail(exc.msg)
            return
        rid = reply.get("id")
        with self.state:
            if rid is None:  # the server speaking for the connection, or a 400/413 for the oldest's line
                oldest = next(iter(self.calls.values()), None)
                if oldest is None or not answers_oldest(reply, oldest.size):
                    self._fail_locked(*unsolicited(reply))
                    return
                rid = oldest.id
            call = self.calls.pop(rid, None)
            if call is None:
                self._fail_locked(f"reply for unknown request id {rid!r}: the stream is out of step")
                return
            if call.abandoned:
                self.orphans -= 1
                if rid == self.hello_id:
                    self._on_hello(reply)
                    return
                if reply["code"]:
                    log.info("dropped reply to abandoned request %s to %s: [%s] %s", rid, self.address,
                             reply["code"], reply.get("msg"))
                return
            call.reply = reply
            call.done = True
            if call.signal is not None and not call.signaled:
                call.signaled = True
                call.signal.release()

    def poll(self) -> None:
        """Read and dispatch whatever replies are already buffered, without blocking (if nobody reads)."""
        took = False  # the reader role is ours
        taking = False  # bytes may be out of the socket and not yet fed
        try:
            # Taken inside the ``try``: the signal check at the end of the ``with`` may raise (Ctrl-C).
            with self.state:
                if self.reading or self.closed:
                    return
                self.reading = took = True
            while not self.closed:
                taking = True
                data = self.io.recv_nowait()
                if data is None:
                    break
                if not data:
                    self._fail("server closed the connection")
                    break
                for line in self.buffer.feed(data):
                    self._on_line(line)
                taking = False
        except OSError as exc:
            self._fail(f"read failed: {exc}")
        except BaseException:
            # A signal's exception (Ctrl-C) after a read returned carries its bytes away: the stream
            # cannot be trusted (it may also have come before any byte was taken: failing is safe).
            if taking:
                self._fail("interrupted while reading")
            raise
        finally:
            if took:
                self._release_reader()

    # -- health and closing ----------------------------------------------------------------------

    def stalled(self, now: float) -> bool:
        """True when, in request order, the oldest unanswered request has waited ``STALL_AFTER`` and no
        reply came in that time: the connection is stuck behind a slow request (under plain load
        replies keep coming, and the connection keeps its callers, which batch better). Never for a
        connection in completion order, where a slow request holds up nobody."""
        if self.unordered or now - self.last_reply <= STALL_AFTER:
            return False
        with self.state:  # other threads add and remove calls meanwhile
            oldest = self._oldest_locked()
        return oldest is not None and now - oldest.sent > STALL_AFTER

    def _oldest_locked(self) -> Call | None:
        """The oldest call in flight (holds ``state``). The reader pops its own call without the lock
        (:meth:`_lead`), which a thread switch can put between ``iter()`` and ``next()``: the dict
        then changed size during the iteration, which starts again (the pop is done by then)."""
        while True:
            try:
                return next(iter(self.calls.values()), None)
            except RuntimeError:
                continue

    def usable(self, now: float, validate_after: float) -> bool:
        """Checkout check: False once closed, forked, or stuck (a reply overdue past its deadline).

        A connection idle for ``validate_after`` seconds is first polled without blocking, so one the
        server closed (goaway or EOF) while it sat in the pool is noticed before a request is risked.
        """
        if self.closed:
            return False
        if self.generation != fork_generation():
            return False
        calls = self.calls
        if calls:
            with self.state:  # other threads add and remove calls meanwhile
                oldest = self._oldest_locked()
            if oldest is not None and oldest.deadline + STUCK_GRACE < now and not self._hello_ignored(oldest):
                self._fail("no reply long past the request's deadline: connection presumed dead")
                return False
        elif now - self.last_active >= validate_after and self.io.readable():
            self.poll()  # a goaway or EOF that came while the connection sat idle
        return not self.closed

    def _hello_ignored(self, oldest: Call) -> bool:
        """``oldest``, overdue, is our HELLO while replies came after it was sent: the server skipped it
        (a server answers HELLO before any later request, 1.1 or not), so it is dropped (request order
        stays) rather than taken for a dead connection failing the calls in flight. True if dropped."""
        if oldest.id != self.hello_id or self.last_reply <= oldest.sent:
            return False
        with self.state:
            if self.calls.pop(oldest.id, None) is not None:
                self.orphans -= 1
            self.hello_id = None
        log.warning("%s never answered the HELLO (protocol 1.1) while answering later requests: "
                    "replies in request order", self.address)
        return True

    def _fail(self, reason: str, kind: type[TransportError] = MaybeExecuted) -> None:
        with self.state:
            self._fail_locked(reason, kind)

    def _fail_locked(self, reason: str, kind: type[TransportError] = MaybeExecuted) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        calls = list(self.calls.values())
        self.calls.clear()
        self.orphans = 0
        for call in calls:
            if call.abandoned:
                continue
            if call.written:
                call.error = kind(f"{self.address}: {reason}")
            elif call.queued:  # its line never went out whole, and the connection is now closed
                call.queued = False
                call.error = NotSent(f"{self.address}: {reason} (request not sent)")
            else:
                continue  # an unwritten call's writer sees ``closed`` and raises NotSent itself
            call.done = True
            if call.signal is not None and not call.signaled:
                call.signaled = True
                call.signal.release()
        if self.generation == fork_generation():
            shutdown(self.sock)
        self._close_socket_if_unused()

    def _close_socket_if_unused(self) -> None:
        if self.closed and not self.sock_closed and not self.reading and not self.writing:
            self.sock_closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def close(self, reason: str = "closed by the client") -> None:
        """Close now; requests still waiting fail with :class:`MaybeExecuted`. Idempotent."""
        self._fail(reason)

    def forget_after_fork(self) -> None:
        """In a forked child: drop this process's descriptor only (no shutdown, which the parent would feel)."""
        # No lock: one held by a thread at fork time stays held forever in the child.
        self.closed = True
        self.reason = "inherited across fork"
        self.calls = {}
        if not self.sock_closed:
            self.sock_closed = True
            try:
                self.sock.close()
            except OSError:
                pass
