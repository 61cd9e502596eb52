"""Reply decoding for the client: the fast path for lines a geventtcp server wrote, and what an id-less one means."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from geventtcp.codec import Codec, _finite_float
from geventtcp.errors import Code, MaybeExecuted, TransportError, Unprocessed
from geventtcp.protocol import GOAWAY_FIELD, decode_reply

__all__ = ["ReplyCodec", "unsolicited", "answers_oldest"]

_TOO_LONG = re.compile(r"request line longer than (\d+) bytes")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class ReplyCodec(Codec):
    """Requests are encoded by the client's codec; replies, which come from a geventtcp server and
    are pure ASCII JSON, are parsed by the orjson codec when that is the client's (its own checks
    keep it exact), otherwise by the stdlib's C scanner: strict UTF-8, no NaN/Infinity, no lone
    surrogates, integers exact, but without the per-object duplicate-key hook the server needs
    against hostile input (a third of a small call's cost; the orjson path does refuse duplicates).
    Anything unreadable is a ``ValueError``, which :meth:`reply` turns into a ProtocolError."""

    def __init__(self, codec: Codec) -> None:
        self.name = codec.name
        self.dumps = codec.dumps  # type: ignore[method-assign]
        decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
        self._raw_decode: Callable[[str], tuple[Any, int]] = decoder.raw_decode
        # The C scanner itself: ``raw_decode`` adds a Python frame and a regex match per line.
        self._scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once  # type: ignore[attr-defined]
        # The orjson codec (its ``loads`` keeps orjson's value only where it is exactly the default
        # codec's, else parses with the strict simplejson codec): a small reply in a fifth of the time.
        self._fast: Callable[[bytes], Any] | None = codec.loads if codec.name == "orjson" else None

    def loads(self, line: bytes) -> Any:
        if self._fast is not None:
            return self._fast(line)
        try:
            text = line.decode("utf-8")
            if text[:1] == "{":  # what a server writes: scan from 0, nothing to skip
                try:
                    value, end = self._scan(text, 0)
                except StopIteration:  # cannot happen after "{"; the full path words the error
                    end = -1
                if end == len(text):
                    return self._post_check(line, value) if 92 in line else value
            value, end = self._raw_decode(text)
        except RecursionError:
            raise ValueError("JSON nesting too deep") from None
        if end != len(text) and not text[end:].isspace():
            raise ValueError(f"extra data after the JSON value at {end}")
        return self._post_check(line, value) if 92 in line else value

    def own_reply(self, line: bytes, cmdid: int, rid: int) -> dict[str, Any] | None:
        """What :meth:`reply` returns for ``line`` (one read, its newline included) when it is exactly
        one line, the success reply a geventtcp server writes to request ``rid`` of ``cmdid``
        (``{"code":0,"cmdid":C,"id":R,"data":D}``, ``protocol.encode_reply``); ``None`` for anything
        else (another reply, more than one line, a line not ending the read), which the line buffer
        and :meth:`reply` then take.

        Why: the lone caller knows the envelope it waits for, so only ``D`` is scanned (each
        object member costs the C scanner ~1,300 instructions; the envelope's four were a quarter of
        a ping). The result is the same dict, keys in the same order: the prefix matched byte for
        byte, the scanner reads ``D`` from its offset exactly as inside the whole line, and the
        line ends right after it (the first newline is the last byte: JSON whitespace inside ``D``
        may be a newline, which would end the line there). Anything unusual (an error, another
        layout, bad text) is None. With the orjson codec, which parses a whole line faster than
        that, it is the line parsed by the same ``loads`` as :meth:`reply` when that is an object
        with an integer ``code`` and the ``id`` ``rid``: exactly the reply :meth:`reply` gives and
        the reader would match to ``rid``.
        """
        if line.find(b"\n") != len(line) - 1:  # -1 too (no newline): a partial line
            return None
        if self._fast is not None:
            return self._own_fast(line[:-1], rid)  # without the newline: the codec's round-trip check compares it
        prefix = b'{"code":0,"cmdid":%d,"id":%d,"data":' % (cmdid, rid)
        if not line.startswith(prefix) or not line.endswith(b"}\n"):
            return None
        scan = self._scan  # an instance attribute: called through a local, the fast call
        try:
            text = line.decode("utf-8")
            data, stop = scan(text, len(prefix))
            if stop != len(text) - 2:  # in characters: D, then the "}" and the newline checked above
                return None
            reply = {"code": 0, "cmdid": cmdid, "id": rid, "data": data}
            return self._post_check(line, reply) if 92 in line else reply
        except (ValueError, StopIteration, RecursionError):  # reply() words the error
            return None

    def _own_fast(self, line: bytes, rid: int) -> dict[str, Any] | None:
        assert self._fast is not None
        try:
            reply = self._fast(line)
        except (ValueError, RecursionError):  # reply() words the error
            return None
        if type(reply) is not dict or type(reply.get("code")) is not int or reply.get("id") != rid:
            return None
        return reply

    def reply(self, line: bytes) -> dict[str, Any]:
        """:func:`geventtcp.protocol.decode_reply` with this codec: the reply, or :class:`ProtocolError`
        if the line is not a JSON object with an integer ``code``."""
        return decode_reply(self, line)


def unsolicited(reply: dict[str, Any]) -> tuple[str, type[TransportError]]:
    """Why the connection must close after ``reply``, a line without ``id``, and how calls on it fail.

    The client always sends ids, so an id-less line is never a caller's reply. A going-away line
    (it has a ``goaway`` field, whatever its code: drain, idle, 408 line not completed, 401 AUTH
    timeout or failures, 403/503 refused at accept, 400 blank-line flood) ends the connection and,
    by the protocol's rule, no request it left unanswered was processed: ``Unprocessed``, safe to
    resend. Any other id-less line that does not answer the oldest call (see
    :func:`answers_oldest`) is the server speaking outside the protocol: written requests are left
    ``MaybeExecuted``. The returned reason carries the server's code and message.
    """
    code = reply["code"]
    goaway = reply.get(GOAWAY_FIELD)
    if goaway is not None:
        if code == Code.UNAVAILABLE:
            return f"server is going away ({goaway}): {reply.get('msg')}", Unprocessed
        return f"server closed the connection ({goaway}): [{code}] {reply.get('msg')}", Unprocessed
    if code == Code.UNAVAILABLE:
        return f"server refused the connection: [503] {reply.get('msg')}", Unprocessed
    return f"server closed the connection with an error for no request: [{code}] {reply.get('msg')}", MaybeExecuted


def answers_oldest(reply: dict[str, Any], size: int) -> bool:
    """True when ``reply``, a line without ``id``, answers the oldest unanswered request, whose line
    was ``size`` bytes (newline included): the server answers in request order (in completion
    order too, an id-less reply comes after every earlier request's reply) and keeps the
    connection after a 400 for a line whose id it could not read (bad JSON, a lone surrogate,
    colliding keys; gRPC likewise fails only the stream whose message is bad) and after a 413 for a
    line over the limit, if that request's line is over the limit the 413 states. Anything else
    is :func:`unsolicited`."""
    code = reply["code"]
    if GOAWAY_FIELD in reply:  # a going-away line answers nobody
        return False
    if code == Code.BAD_REQUEST:
        return True
    if code != Code.TOO_LARGE:
        return False
    found = _TOO_LONG.search(str(reply.get("msg")))
    return found is not None and size > int(found.group(1))
