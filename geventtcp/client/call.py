"""One client request in flight: the state its caller and the connection's reader share, and its wire line."""

from __future__ import annotations

import re
from time import time as _time
from typing import Any

from geventtcp.codec import Codec, SimplejsonCodec
from geventtcp.errors import NotSent

__all__ = ["Call", "DEADLINE_MARGIN", "request_line", "check_params"]

#: Share of the caller's remaining time kept back from the ``timeout_ms`` sent to the server (at most
#: 50 ms), so that the server's 504 reply arrives before the caller's own deadline.
DEADLINE_MARGIN = 0.05


class Call:
    """One request in flight: the state the reader and the waiting caller share."""

    __slots__ = ("id", "cmdid", "deadline", "sent", "size", "reply", "error", "done", "written", "queued", "signal",
                 "signaled", "abandoned", "leading")

    def __init__(self, id: int, deadline: float, abandoned: bool) -> None:
        self.id = id
        self.cmdid = 0  # set with ``id``: together they name the reply a lone caller expects
        self.sent = 0.0
        self.size = 0  # bytes of the request line, newline included
        self.deadline = deadline
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.done = False
        self.written = False
        self.queued = False  # waiting in a BatchingConnection's send queue
        self.signal: Any = None
        self.signaled = False
        self.abandoned = abandoned  # nobody waits: the reply is read and dropped
        self.leading = False  # its caller holds the reader role, not yet in _lead (ClientConnection.request)


def request_line(codec: Codec, cmdid: int, params: Any, call: Call, rid: int, now: float, address: str,
                 meta: bytes = b"") -> bytes:
    """Number ``call`` as ``rid``, stamp it sent at ``now`` (and its size) and encode its request line, whose
    ``timeout_ms`` is the call's remaining time less :data:`DEADLINE_MARGIN`.

    The line is byte for byte what :func:`geventtcp.protocol.encode_request` writes; its head
    (``{"cmdid":N,"timestamp":T,"params":``) is cached per cmdid for the current second, so a call
    formats only its id and ``timeout_ms`` (``%d`` truncates a float as ``int()`` does). ``meta`` is
    the request's ``,"meta":{...}`` field already encoded (:func:`geventtcp.protocol.encode_meta`), or
    empty.
    Raises :class:`NotSent` when the deadline already passed (nothing is numbered then), and
    ``TypeError``/``ValueError`` when ``cmdid`` is not an integer or ``params`` has no JSON form or
    one the server refuses (see :func:`check_params`; then nothing is numbered or sent either).
    """
    remaining = call.deadline - now
    if remaining <= 0.0:  # float constants here: a float compared with an int takes the slow path
        raise NotSent(f"deadline passed before the request to {address} was written")
    heads = _heads
    stamp = _time()
    if not heads.start <= stamp < heads.end:
        heads = _turn(stamp)
    head = heads.get(cmdid) if type(cmdid) is int else None
    if head is None:
        head = heads.add(cmdid)
    if params is None or (type(params) is dict and not params):
        body = b"{}"
    else:
        body = codec.dumps(params)
        # A ``\ud`` escape (maybe of a lone surrogate: the codecs write hex digits in lower case;
        # ``92 in`` is a memchr for the backslash first) or a key ending as a number, true, false,
        # null, NaN or Infinity would (maybe a converted non-str key): check_params looks closer.
        if (92 in body and body.find(b"\\ud") >= 0) or body.translate(_KEY_TAIL).find(b'0":') >= 0:
            check_params(body)
    margin = remaining * 0.1
    if margin > DEADLINE_MARGIN:
        margin = DEADLINE_MARGIN
    timeout_ms = (remaining - margin) * 1000.0
    if timeout_ms < 1.0:
        timeout_ms = 1.0
    line = b'%b%b,"id":%d,"timeout_ms":%d%b}\n' % (head, body, rid, timeout_ms, meta)
    call.id = rid
    call.cmdid = cmdid
    call.sent = now
    call.size = len(line)
    return line


#: Maps every last character a non-str dict key can have once written as a JSON key (digits for
#: int, float and Decimal; ``e`` for true/false, ``l`` for null, ``N``/``y`` for Decimal NaN and
#: Infinity) to ``0``, so one ``find`` screens a body for keys that may have been converted.
_KEY_TAIL = bytes.maketrans(b"0123456789elNy", b"0" * 14)
#: Keys ending in a digit (a number: int, float, Decimal) become ``0":`` through this table.
_DIGITS = bytes.maketrans(b"123456789", b"0" * 9)
#: A key written from True, False, None, or a Decimal NaN or Infinity (the leading ``"`` is a
#: literal prefix, which the regex engine scans for quickly; plain alternatives, since an optional
#: part or a number pattern here costs 2-3x as much).
_LITERAL_KEY = re.compile(rb'"(?:true|false|null|NaN|sNaN|-NaN|-sNaN|Infinity|-Infinity)":')
#: A ``\\ud`` escape of a surrogate half that is not part of a pair (a pair is a valid character),
#: or a pair whose high half follows a backslash: that may be an escaped backslash and text
#: (``"\\\\ud800"``) before a lone low half, which the lookbehind alone would take for a pair.
_LONE_SURROGATE = re.compile(rb"\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f])|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f]"
                             rb"|\\\\ud[89ab][0-9a-f]{2}\\ud[c-f]")
#: The server's own parser: a body it accepts is a body this check accepts.
_SERVER_CODEC = SimplejsonCodec()


def check_params(body: bytes) -> None:
    """Raise ``ValueError`` when the server would refuse the encoded params ``body`` with a 400.

    Two kinds of value encode without error yet are not strict JSON, which the server requires: a
    string with a lone surrogate (``os.fsdecode()`` of an undecodable file name; written as a
    ``\\udXXX`` escape) and a dict whose keys collide once converted to JSON strings
    (``{1: "a", "1": "b"}`` gives two ``"1"`` keys). Either would make the server answer 400, and an
    answer it cannot give an id to costs the caller a connection shared with others, so the client
    refuses first, as it does for NaN: nothing is numbered or sent. Called only for a body with a
    ``\\ud`` escape or a key that may have been converted (a cheap screen in :func:`request_line`);
    when the finer screen here still matches, the body goes through the server's parser itself.
    (Not caught: a ``bytes`` key equal to a str key, which simplejson writes as the same string.)
    """
    if ((92 in body and body.find(b"\\ud") >= 0 and _LONE_SURROGATE.search(body) is not None)
            or body.translate(_DIGITS).find(b'0":') >= 0 or _LITERAL_KEY.search(body) is not None):
        try:
            _SERVER_CODEC.loads(body)
        except ValueError as exc:
            raise ValueError(f"params the server would refuse (400), not sent: {exc}") from None


class _Heads(dict[int, bytes]):
    """Request-line heads by cmdid for the wall-clock second ``[start, end)`` (bounded: an
    application has few cmdids). Never changes second: a new second gets a new table (so threads
    racing at the turn only build the same bytes twice, never file one under the wrong second)."""

    __slots__ = ("second", "start", "end")  # read on every call: slots are the fast attribute lookup

    def __init__(self, second: int) -> None:
        super().__init__()
        self.second = second
        self.start, self.end = float(second), float(second + 1)

    def add(self, cmdid: Any) -> bytes:
        """The head for ``cmdid``; TypeError when it is not an integer (``bool`` included)."""
        if type(cmdid) is not int and not (isinstance(cmdid, int) and not isinstance(cmdid, bool)):
            raise TypeError(f"cmdid must be an integer, not {type(cmdid).__name__}")
        head = b'{"cmdid":%d,"timestamp":%d,"params":' % (cmdid, self.second)
        if type(cmdid) is int and len(self) < 1024:
            self[cmdid] = head
        return head


_heads = _Heads(0)


def _turn(stamp: float) -> _Heads:
    """The table for the second ``stamp`` falls in (the clock moved on, or back), now the current one."""
    global _heads
    _heads = _Heads(int(stamp))
    return _heads
