"""The geventtcp wire protocol, version 1.1: sans-IO framing, request parsing, reply encoding, HELLO.

The specification is ``docs/protocol.md`` (one document, written so that a third party can
implement a client or a server from it); ``conformance/vectors.json`` states its rules as data, and
the test suite plays them against the real server. This module is their implementation, and the
numbers it defines (limits, ranges, reserved cmdids, going-away reasons and their codes) are the
normative ones: ``docs/reference/wire.md`` is generated from them, and server and client import
them from here, never repeating a number.

Nothing here touches a socket, gevent or logging: bytes go in, requests and reply lines come out,
so every framing edge case is a plain unit test. Server and client share this module.

What is where:

* Framing: :class:`LineBuffer` (lines out of a byte stream, the line limit, blank lines).
* Requests: :func:`parse_request` (fields, their types and ranges, strict JSON, ``meta``; a
  :class:`~geventtcp.errors.ProtocolError` carries whatever valid ``id``/``cmdid`` the 400 may
  echo, recovered by a lenient second parse for JSON the strict parse refused) and
  :func:`encode_request` (the client side).
* Replies: :func:`encode_reply`, :func:`encode_error`, :func:`encode_goaway` (the last line before
  a close, for every reason in :data:`GOAWAY_REASONS`), :func:`decode_reply`.
* Protocol 1.1: :func:`hello_params`, :func:`negotiate` (the server's side of HELLO),
  :func:`accepted_features` (the client's). Which replies may leave in completion order is the
  server connection's business (``geventtcp.server.connection``); the rule is in the spec.
* Built-in commands: :class:`Builtin`, :data:`PREAUTH_CMDIDS`, :data:`READ_ONLY_BUILTINS`.
"""

from __future__ import annotations

import enum
import json
import re
import time
import types
from collections.abc import Mapping
from typing import Any, TypeVar, overload

from geventtcp.codec import Codec
from geventtcp.errors import Code, ProtocolError
from geventtcp.identity import Identity

__all__ = [
    "PROTOCOL_VERSION",
    "PROTOCOL",
    "UNORDERED",
    "FEATURES",
    "hello_params",
    "negotiate",
    "accepted_features",
    "DEFAULT_MAX_LINE_BYTES",
    "MAX_TIMEOUT_MS",
    "MAX_ID",
    "MAX_ID_CHARS",
    "MIN_CMDID",
    "MAX_CMDID",
    "MAX_TIMESTAMP",
    "MIN_TIMESTAMP",
    "BLANK",
    "PREAUTH_MAX_LINE_BYTES",
    "GOAWAY_FIELD",
    "MAX_META_ENTRIES",
    "MAX_META_CHARS",
    "EMPTY_META",
    "meta_problem",
    "encode_meta",
    "GOAWAY_REASONS",
    "Builtin",
    "PREAUTH_CMDIDS",
    "READ_ONLY_BUILTINS",
    "LineBuffer",
    "Request",
    "parse_request",
    "encode_request",
    "encode_reply",
    "encode_error",
    "encode_goaway",
    "decode_reply",
]

#: The protocol's major version, reported by PING (``data.protocol``); minor versions add only
#: features a client asks for (HELLO), so a 1.0 peer is never surprised.
PROTOCOL_VERSION = 1
#: The newest protocol a server speaks, as HELLO states it (a string: "1.1" is not a number to compare).
PROTOCOL = "1.1"
#: The HELLO feature that lets the server answer requests carrying an id in completion order.
UNORDERED = "unordered"
#: The features this implementation offers in HELLO.
FEATURES = (UNORDERED,)
#: Longest request line accepted, newline included (gRPC's default receive limit is 4 MiB,
#: Redis's inline limit 64 KiB; parsing 1 MiB of JSON already holds a worker for ~40 ms).
DEFAULT_MAX_LINE_BYTES = 1 << 20
#: Largest ``timeout_ms`` accepted (2**31 - 1 ms, about 24.8 days, the usual 32-bit timer bound).
MAX_TIMEOUT_MS = 2**31 - 1
#: Longest line accepted before a connection has authenticated (Redis caps unauthenticated
#: requests the same way), so an anonymous peer cannot make the server parse megabytes.
PREAUTH_MAX_LINE_BYTES = 64 * 1024
#: Why a server ends a connection, the value of a going-away line's ``goaway`` field, with the code
#: that line carries. Drain and recycling (503: nothing wrong, go elsewhere), then the errors.
GOAWAY_REASONS: dict[str, int] = {
    "shutdown": Code.UNAVAILABLE,         # the server is stopping
    "reload": Code.UNAVAILABLE,           # the worker is being replaced (new code or settings)
    "idle": Code.UNAVAILABLE,             # no request for idle_timeout
    "max_age": Code.UNAVAILABLE,          # the connection reached max_connection_age
    "max_requests": Code.UNAVAILABLE,     # the worker reached max_requests and is recycled
    "closing": Code.UNAVAILABLE,          # the worker closes the connection for another reason
    "overloaded": Code.UNAVAILABLE,       # refused at accept: connection limits (max_connections, per peer)
    "forbidden": Code.PERMISSION_DENIED,  # refused at accept: protected mode
    "request_timeout": Code.REQUEST_TIMEOUT,  # a request line was not completed within request_timeout
    "auth_timeout": Code.UNAUTHENTICATED,     # AUTH did not succeed within auth_timeout
    "auth_failed": Code.UNAUTHENTICATED,      # AUTH failed MAX_AUTH_FAILURES times
    "bad_input": Code.BAD_REQUEST,            # 1024 blank lines in a row
}
#: Request ids: integers exactly representable as an IEEE double (JavaScript's safe integers), or
#: strings of at most ``MAX_ID_CHARS`` characters; anything else is refused and not echoed.
MAX_ID = 2**53 - 1
#: The longest string id (in characters): an id is a key for matching, not a payload.
MAX_ID_CHARS = 256
#: cmdids are signed 32-bit integers: applications use 0 .. MAX_CMDID, the built-ins negative ones.
MIN_CMDID = -(2**31)
#: The largest cmdid (2**31 - 1); anything outside MIN_CMDID .. MAX_CMDID is refused (400, cmdid null).
MAX_CMDID = 2**31 - 1
#: Timestamps are signed 64-bit integers (seconds; the server only reports them): MIN_TIMESTAMP .. MAX_TIMESTAMP.
MIN_TIMESTAMP = -(2**63)
#: The largest timestamp (2**63 - 1).
MAX_TIMESTAMP = 2**63 - 1
#: The key that marks a going-away line (its value is the reason), as opposed to a reply.
GOAWAY_FIELD = "goaway"
#: Most entries a request's ``meta`` may have.
MAX_META_ENTRIES = 32
#: Most characters of a request's ``meta``, keys and values together (gRPC's default limit on a
#: call's metadata is 8 KiB; a W3C ``tracestate`` is at most 32 entries of 256 characters).
MAX_META_CHARS = 8192
#: ``Request.meta`` of a request without meta: shared and read-only, so a request without meta
#: costs no allocation and a handler cannot leak an entry into the next request.
EMPTY_META: Mapping[str, str] = types.MappingProxyType({})
_META_KEY = re.compile(r"[a-z0-9_.\-]{1,64}\Z")


class Builtin(enum.IntEnum):
    """The reserved cmdids: the server's built-in commands (applications use cmdids >= 0)."""

    PING = -1
    LIST = -2
    STATS = -3
    AUTH = -4
    HELLO = -5


#: Answered before a connection has authenticated: AUTH itself, PING for health checks, and HELLO
#: (it reveals only the protocol version and features, and lets a client negotiate in the same
#: write as its AUTH).
PREAUTH_CMDIDS = (Builtin.AUTH, Builtin.PING, Builtin.HELLO)
#: Built-ins that only read, so a client may always send them again (plain ints: a set lookup
#: with an application's cmdid never goes through the enum).
READ_ONLY_BUILTINS = frozenset(int(cmdid) for cmdid in (Builtin.PING, Builtin.LIST, Builtin.STATS))


#: JSON's whitespace without the newline: a line of nothing else is blank.
BLANK = b" \t\r"
#: A read whose lines average at least this many bytes (newline included) is not searched for blank
#: lines: parsing it costs per byte no more than a stream of PINGs (13 bytes each) does, even if some
#: of its lines are blank (the caller then finds those blank after their parse failed). The average
#: is one division per read, where even the shortest line's length would be a loop over the lines.
_BLANK_CHECK_BYTES = 16


class LineBuffer:
    """Splits a byte stream into lines and never holds more than ``max_line_bytes`` of one line.

    ``feed(data)`` returns the complete lines ``data`` finished, without their ``\\n``. A line that
    outgrows the limit comes out as ``None`` (once, as soon as it is known to be too long) and the
    rest of it, up to its newline, is dropped. ``pending`` is the size of the unfinished line;
    ``incomplete`` (a plain attribute, cheap to read per ``recv``) is true while part of a line is
    held or a too-long line is being dropped.

    With ``skip_blank`` (the server's request side), blank lines (only :data:`BLANK` bytes) in a
    read of short lines (``_BLANK_CHECK_BYTES`` on average) never become list items: they are
    dropped before anything parses them and counted in ``blank_lines`` (which the owner may read
    and reset), and ``blank_run`` is how many came in a row since the last other line. A blank line
    then costs the server about what splitting it off costs, instead of a JSON parse and an
    exception each.
    """

    __slots__ = ("max_line_bytes", "cut_limit", "skip_blank", "blank_lines", "blank_run", "_partial",
                 "_discarding", "incomplete")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, skip_blank: bool = False) -> None:
        self.max_line_bytes = max_line_bytes
        #: The limit the last ``None`` was measured against (the owner may change ``max_line_bytes``
        #: between a ``feed`` and answering its lines, as AUTH does).
        self.cut_limit = max_line_bytes
        self.skip_blank = skip_blank
        self.blank_lines = 0
        self.blank_run = 0
        self._partial = b""
        self._discarding = False
        self.incomplete = False

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line held (0 while a too-long line is being dropped)."""
        return len(self._partial)

    @property
    def discarding(self) -> bool:
        """True while the rest of a too-long line is being dropped."""
        return self._discarding

    def feed(self, data: bytes) -> list[bytes | None]:
        """Add received bytes; return the lines they complete (``None`` for a too-long line)."""
        if self._discarding:
            cut = data.find(b"\n")
            if cut < 0:
                return []  # still dropping: ``incomplete`` stays true
            self._discarding = False
            data = data[cut + 1 :]
        if self._partial:
            data = self._partial + data
        lines: list[bytes | None] = data.split(b"\n")  # type: ignore[assignment]
        rest = lines.pop()
        assert rest is not None
        if self.skip_blank and lines:
            if len(data) - len(rest) < _BLANK_CHECK_BYTES * len(lines):
                lines = self._drop_blank(lines)
            else:
                self.blank_run = 0
        limit = self.max_line_bytes
        if len(rest) >= limit:  # the line cannot fit even with its newline
            lines.append(None)
            self._discarding = True
            self.cut_limit = limit
            rest = b""
        self._partial = rest
        self.incomplete = self._discarding or bool(rest)
        if len(data) > limit:  # some complete line may be over the limit as well
            lines = [None if line is not None and len(line) >= limit else line for line in lines]
            self.cut_limit = limit
        return lines

    def _drop_blank(self, lines: list[bytes | None]) -> list[bytes | None]:
        """The lines without the blank ones, which are counted (a read with a short line only)."""
        kept = [line for line in lines if line.strip(BLANK)]  # type: ignore[union-attr]
        dropped = len(lines) - len(kept)
        if not dropped:
            self.blank_run = 0
            return lines
        self.blank_lines += dropped
        if not kept:
            self.blank_run += dropped
            return kept
        tail = 0  # blank lines after the last other line
        for line in reversed(lines):
            if line.strip(BLANK):  # type: ignore[union-attr]
                break
            tail += 1
        self.blank_run = tail
        return kept


class Request:
    """One request as handlers see it (the seed's fields, plus ``id``, a deadline and ``meta``).

    ``meta`` is the request's metadata (see the module docstring): a read-only mapping of str to
    str, :data:`EMPTY_META` when the line carried none; never ``None``, so a handler
    reads ``request.meta.get("tenant")`` without a check. ``rawBody`` is the line as received
    (without its line ending), decoded as text; ``raw`` is
    the same as bytes. ``deadline`` is a ``time.monotonic()`` value or ``None``. ``cancelled``
    turns true when the client is gone (the reply can no longer be delivered). Only the protocol's
    fields are here: a server serves a subclass that adds its own (``geventtcp.server.request``).
    """

    __slots__ = ("address", "raw", "cmdid", "timestamp", "params", "id", "has_id", "deadline", "timeout_ms",
                 "meta")

    def __init__(
        self,
        address: Any,
        raw: bytes,
        cmdid: int,
        params: dict[str, Any],
        timestamp: int,
        id: Any = None,
        has_id: bool = False,
        timeout_ms: int | None = None,
        received: float | None = None,
        meta: Mapping[str, str] = EMPTY_META,
    ) -> None:
        self.address = address
        self.meta = meta
        self.raw = raw
        self.cmdid = cmdid
        self.params = params
        self.timestamp = timestamp
        self.id = id
        self.has_id = has_id
        self.timeout_ms = timeout_ms
        if timeout_ms is None:
            self.deadline: float | None = None
        else:  # counted from when the line was read, not from when its turn to be parsed came
            self.deadline = (time.monotonic() if received is None else received) + timeout_ms / 1000.0

    @property
    def cancelled(self) -> bool:
        """True once nobody can receive the reply (the connection was reset, failed or was closed);
        always false for a request no connection serves (one a test builds)."""
        return False

    @property
    def identity(self) -> Identity:
        """Who sent the request (peer address, verified TLS client certificate, AUTH passed); for a
        request no connection serves (one a test builds), only its ``address``."""
        return Identity(self.address)

    @property
    def rawBody(self) -> str:  # noqa: N802 - the seed's name
        return self.raw.rstrip(b"\r").decode("utf-8")

    def __repr__(self) -> str:
        return f"<Request cmdid={self.cmdid} id={self.id!r} from {self.address!r}>"


_R = TypeVar("_R", bound=Request)


def _int_field(value: Any) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isdigit() and value.isascii() and len(value) <= 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return None


@overload
def parse_request(line: bytes, codec: Codec, address: Any = None, received: float | None = None) -> Request: ...


@overload
def parse_request(line: bytes, codec: Codec, address: Any, received: float | None, cls: type[_R]) -> _R: ...


def parse_request(line: bytes, codec: Codec, address: Any = None, received: float | None = None,
                  cls: type[Request] = Request) -> Request:
    """Turn one line (without ``\\n``) into a :class:`Request`, or into ``cls``, a subclass that adds
    no ``__init__`` (a server's request is built directly, one object per line).

    Raises :class:`ProtocolError` with code 400 for anything that is not a valid request; its
    ``id``/``has_id`` and ``cmdid`` carry whatever valid values could still be recovered, for the
    error reply (an invalid cmdid is ``None``, never the raw value; an invalid id is not echoed).
    """
    try:
        body = codec.loads(line)
    except ValueError as exc:
        raise _refused(line, f"invalid JSON: {exc}") from None
    if type(body) is not dict:
        raise ProtocolError("a request must be a JSON object")
    get = body.get
    rid = get("id")
    has_id = rid is not None  # null is no id: the reply carries none
    if has_id and not (-MAX_ID <= rid <= MAX_ID if type(rid) is int
                       else type(rid) is str and len(rid) <= MAX_ID_CHARS):
        raise _bad_id(get("cmdid"))
    raw_cmdid = get("cmdid")
    cmdid = raw_cmdid if type(raw_cmdid) is int else _int_field(raw_cmdid)
    if cmdid is None or not MIN_CMDID <= cmdid <= MAX_CMDID:
        what = "missing cmdid" if raw_cmdid is None else f"cmdid must be an integer from {MIN_CMDID} to {MAX_CMDID}"
        raise ProtocolError(what, id=rid, has_id=has_id)
    params = get("params")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise ProtocolError("params must be a JSON object", id=rid, has_id=has_id, cmdid=cmdid)
    ts = get("timestamp")
    if type(ts) is int and MIN_TIMESTAMP <= ts <= MAX_TIMESTAMP:
        timestamp = ts
    elif ts is None:
        timestamp = int(time.time())
    else:
        timestamp = _timestamp(ts, rid, has_id, cmdid)
    timeout_ms = get("timeout_ms")
    if timeout_ms is not None and (type(timeout_ms) is not int or not 0 < timeout_ms <= MAX_TIMEOUT_MS):
        raise ProtocolError(f"timeout_ms must be an integer from 1 to {MAX_TIMEOUT_MS}", id=rid, has_id=has_id,
                            cmdid=cmdid)
    meta = get("meta")  # one lookup when absent: a request without meta pays nothing more
    if meta is None:
        return cls(address, line, cmdid, params, timestamp, rid, has_id, timeout_ms, received)
    problem = meta_problem(meta)
    if problem is not None:
        raise ProtocolError(problem, id=rid, has_id=has_id, cmdid=cmdid)
    # Read-only, as the empty one is: a handler or middleware that wrote into it would work only for
    # callers that sent meta (and fail for the others).
    return cls(address, line, cmdid, params, timestamp, rid, has_id, timeout_ms, received,
               types.MappingProxyType(meta))


def meta_problem(meta: Any) -> str | None:
    """Why ``meta`` is not a valid request ``meta`` (the rules of the module docstring), or ``None``.

    The message never quotes the offending key or value: it goes into a 400 reply, and a value
    that is not printable ASCII (a lone surrogate) could make that reply unreadable.
    """
    if type(meta) is not dict:
        return "meta must be a JSON object"
    if len(meta) > MAX_META_ENTRIES:
        return f"meta has more than {MAX_META_ENTRIES} entries"
    size = 0
    for key, value in meta.items():
        if type(key) is not str or _META_KEY.match(key) is None:
            return "meta keys must be 1 to 64 characters of a-z, 0-9, '_', '.', '-'"
        if type(value) is not str:
            return f"meta value of {key} must be a string"
        if not (value.isascii() and value.isprintable()):  # space to ``~``, as a regex would say, in C
            return f"meta value of {key} must be printable ASCII"
        size += len(key) + len(value)
    if size > MAX_META_CHARS:
        return f"meta longer than {MAX_META_CHARS} characters"
    return None


def _timestamp(ts: Any, rid: Any, has_id: bool, cmdid: int) -> int:
    """A timestamp that is not a plain integer in range: a digit string or a finite float (the seed's
    clients sent both) becomes its integer; anything else, or out of range, is a 400."""
    value = _int_field(ts)
    if value is None and type(ts) is float and MIN_TIMESTAMP <= ts <= MAX_TIMESTAMP:  # NaN fails both
        value = int(ts)
    if value is None or not MIN_TIMESTAMP <= value <= MAX_TIMESTAMP:
        raise ProtocolError(f"timestamp must be an integer from {MIN_TIMESTAMP} to {MAX_TIMESTAMP}", id=rid,
                            has_id=has_id, cmdid=cmdid)
    return value


def _valid_cmdid(raw_cmdid: Any) -> int | None:
    """``raw_cmdid`` as the cmdid an error reply may echo: an integer in range, else ``None``."""
    cmdid = _int_field(raw_cmdid)
    return cmdid if cmdid is not None and MIN_CMDID <= cmdid <= MAX_CMDID else None


def _bad_id(raw_cmdid: Any) -> ProtocolError:
    """The 400 for an id of the wrong type or out of range: not echoed (a client could not match it)."""
    return ProtocolError(f"id must be an integer from -{MAX_ID} to {MAX_ID} or a string of at most "
                         f"{MAX_ID_CHARS} characters", cmdid=_valid_cmdid(raw_cmdid))


class _Pairs(list):  # type: ignore[type-arg]
    """An object as the lenient parse of :func:`_refused` sees it: its key/value pairs, duplicates kept."""

    __slots__ = ()


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: For error replies only: reads a line that is JSON but that the strict codec refuses (duplicate keys,
#: lone surrogates, numbers out of range), to find its id and cmdid.
_LENIENT = json.JSONDecoder(object_pairs_hook=_Pairs, parse_constant=_not_json)


def _refused(line: bytes, msg: str) -> ProtocolError:
    """The 400 for a line the strict codec refused, carrying its id and cmdid when they are readable.

    The error path only: a second, lenient parse of a line that looks like an object, so that a
    multiplexing client can match the 400. A value is recovered only when it is unambiguous (its
    key appears once at the top level) and valid (an id with a lone surrogate is not echoed).
    """
    if line.lstrip(b" \t\r")[:1] != b"{":
        return ProtocolError(msg)
    try:
        pairs = _LENIENT.decode(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return ProtocolError(msg)
    if type(pairs) is not _Pairs:
        return ProtocolError(msg)
    found: dict[str, Any] = {}
    twice: set[str] = set()
    for key, value in pairs:
        if key == "id" or key == "cmdid":
            if key in found:
                twice.add(key)
            found[key] = value
    rid: Any = None
    has_id = False
    if "id" in found and "id" not in twice:
        value = found["id"]
        if (type(value) is int and -MAX_ID <= value <= MAX_ID) or (
                type(value) is str and len(value) <= MAX_ID_CHARS and _encodable(value)):
            rid, has_id = value, True
    cmdid = _valid_cmdid(found["cmdid"]) if "cmdid" in found and "cmdid" not in twice else None
    return ProtocolError(msg, id=rid, has_id=has_id, cmdid=cmdid)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: ``{"code":0,"cmdid":N,"data":`` per cmdid: a success reply is this prefix, the data's JSON and
#: ``}``, byte for byte what encoding the whole reply object gives (the reply object is built
#: here, so its data can never contain it and the circular-reference check sees the same).
_REPLY_HEADS: dict[int, bytes] = {}


def encode_reply(codec: Codec, cmdid: int, data: Any, id: Any = None, has_id: bool = False) -> bytes:
    """Encode a success reply line; ``ValueError``/``TypeError`` if ``data`` has no JSON form
    (a lone surrogate included: the client's strict codec would refuse the line)."""
    if type(cmdid) is int:
        if not has_id:
            head = _REPLY_HEADS.get(cmdid)
            if head is None:
                head = b'{"code":0,"cmdid":%d,"data":' % cmdid
                if len(_REPLY_HEADS) < 4096:
                    _REPLY_HEADS[cmdid] = head
            line = head + codec.dumps(data) + b"}\n"
        elif type(id) is int:
            line = b'{"code":0,"cmdid":%d,"id":%d,"data":' % (cmdid, id) + codec.dumps(data) + b"}\n"
        elif type(id) is str:
            line = (b'{"code":0,"cmdid":%d,"id":' % cmdid + codec.dumps(id) + b',"data":' + codec.dumps(data)
                    + b"}\n")
        else:
            line = codec.dumps({"code": 0, "cmdid": cmdid, "id": id, "data": data}) + b"\n"
    elif has_id:
        line = codec.dumps({"code": 0, "cmdid": cmdid, "id": id, "data": data}) + b"\n"
    else:
        line = codec.dumps({"code": 0, "cmdid": cmdid, "data": data}) + b"\n"
    if 92 in line:  # a backslash (memchr): only then can a surrogate escape be in the line
        codec.check_surrogates(line, data)
    return line


def encode_error(codec: Codec, code: int, msg: str, cmdid: Any = None, id: Any = None, has_id: bool = False) -> bytes:
    """Encode an error reply line; never raises (an unencodable id or cmdid is replaced by null)."""
    reply: dict[str, Any] = {"code": int(code), "cmdid": cmdid}
    if has_id:
        reply["id"] = id
    reply["msg"] = msg
    try:
        return codec.dumps(reply) + b"\n"
    except (ValueError, TypeError):
        reply["cmdid"] = None
        if has_id:
            reply["id"] = None
        return codec.dumps(reply) + b"\n"


def encode_goaway(codec: Codec, reason: str, msg: str | None = None) -> bytes:
    """Encode a going-away line: the last line the server sends before it closes the connection;
    ``reason`` is one of :data:`GOAWAY_REASONS`, which gives the line's code (503 for others)."""
    return codec.dumps({"code": int(GOAWAY_REASONS.get(reason, Code.UNAVAILABLE)), "cmdid": None,
                        GOAWAY_FIELD: reason, "msg": msg or f"server is going away ({reason})"}) + b"\n"


def hello_params(features: tuple[str, ...] = FEATURES) -> dict[str, Any]:
    """The params of a client's HELLO asking for ``features``."""
    return {"protocol": PROTOCOL, "features": list(features)}


def negotiate(params: dict[str, Any], in_force: frozenset[str] = frozenset()) -> tuple[dict[str, Any], frozenset[str]]:
    """The server's side of HELLO: its reply data and the features in force on the connection from
    the next request on.

    ``params.features`` (optional, default none) is a list of strings: the requested features this
    server knows are switched on, the others ignored. ``params.protocol`` (optional) is a string, the
    client's newest protocol, for information. Features once on stay on (``in_force``: a later HELLO
    cannot switch them off, so replies already allowed out of order never have to be reordered).
    :class:`ProtocolError` (400) for params of the wrong type.
    """
    protocol = params.get("protocol")
    if protocol is not None and type(protocol) is not str:
        raise ProtocolError("HELLO params.protocol must be a string")
    wanted = params.get("features", [])
    if type(wanted) is not list or any(type(name) is not str for name in wanted):
        raise ProtocolError("HELLO params.features must be a list of strings")
    now = in_force | frozenset(name for name in wanted if name in FEATURES)
    return {"protocol": PROTOCOL, "features": sorted(now)}, now


def accepted_features(reply: dict[str, Any]) -> frozenset[str]:
    """The client's side of HELLO: the features a reply line (decoded) switched on; none for an
    error reply (a server before 1.1 answers 404 ``unknown cmdid -5``) or a reply it cannot read."""
    if reply.get("code") != 0:
        return frozenset()
    data = reply.get("data")
    features = data.get("features") if type(data) is dict else None
    if type(features) is not list:
        return frozenset()
    return frozenset(name for name in features if type(name) is str)


def encode_request(
    codec: Codec,
    cmdid: int,
    params: Any = None,
    id: Any = None,
    timeout_ms: int | None = None,
    timestamp: int | None = None,
    meta: Mapping[str, str] | None = None,
) -> bytes:
    """Encode a request line (the client side of the same contract).

    Only ``params`` (and a non-integer ``id``) go through the codec; the envelope is formatted
    directly, which keeps a client's per-call cost down. ``ValueError``/``TypeError`` when ``params``
    has no strict JSON form or ``cmdid`` is not an integer; ``ValueError`` when ``meta`` (sent when
    not empty) breaks a rule of the module docstring.
    """
    if type(cmdid) is not int and not (isinstance(cmdid, int) and not isinstance(cmdid, bool)):
        raise TypeError(f"cmdid must be an integer, not {type(cmdid).__name__}")
    body = b"{}" if params is None or (type(params) is dict and not params) else codec.dumps(params)
    line = b'{"cmdid":%d,"timestamp":%d,"params":%b' % (
        cmdid, int(time.time()) if timestamp is None else timestamp, body)
    if id is not None:
        line += b',"id":%d' % id if type(id) is int else b',"id":' + codec.dumps(id)
    if timeout_ms is not None:
        line += b',"timeout_ms":%d' % max(1, int(timeout_ms))
    if meta:
        line += encode_meta(codec, meta)
    return line + b"}\n"


def encode_meta(codec: Codec, meta: Mapping[str, str]) -> bytes:
    """``,"meta":{...}``, the request field for ``meta`` (a client adds it to a request line);
    ``ValueError`` when ``meta`` breaks a rule of the module docstring (the server would answer 400)."""
    meta = dict(meta)
    problem = meta_problem(meta)
    if problem is not None:
        raise ValueError(f"{problem}: {meta!r}"[:300])
    return b',"meta":' + codec.dumps(meta)


def decode_reply(codec: Codec, line: bytes) -> dict[str, Any]:
    """Parse a reply line; :class:`ProtocolError` if it is not a JSON object with an integer code."""
    try:
        reply = codec.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"invalid reply from server: {exc}", fatal=True) from None
    if type(reply) is not dict or type(reply.get("code")) is not int:
        raise ProtocolError("invalid reply from server: not an object with an integer code", fatal=True)
    return reply
