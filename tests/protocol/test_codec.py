"""The codecs: strict parsing rules, and the orjson codec giving exactly the default codec's outcome."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geventtcp.codec import CODECS, OrjsonCodec, SimplejsonCodec, get_codec
from geventtcp.protocol import encode_reply, parse_request

EXACT = SimplejsonCodec()
FAST = OrjsonCodec()


def nested(depth: int, compact: bool = True) -> bytes:
    return b"[" * depth + b"]" * depth if compact else b"[ " * depth + b"]" * depth


#: Request lines: valid ones in many layouts, and every strict rule broken at least once.
LINES: list[bytes] = [
    b'{"cmdid":1,"timestamp":0,"params":{"content":"Hello world!"}}',
    b'{"cmdid": 1, "timestamp": 0, "params": {"content": "Hello world!"}}',  # json.dumps layout
    b'{"cmdid":1,"params":{"a":[1,2.5,-0.0,1e16,1E2,5e-324,1.7976931348623157e308,true,false,null]}}',
    b'{"cmdid":1,"params":{"f":0.1,"g":-1.5,"h":100.0,"i":1.0e5}}',
    b'{"cmdid":1,"params":{"n":-0}}',
    b'{"cmdid":1,"params":{"u":"caf\xc3\xa9 \xe2\x80\xa8 \xf0\x9f\x98\x80"}}',  # raw UTF-8, U+2028, emoji
    b'{"cmdid":1,"params":{"u":"caf\\u00e9 \\ud83d\\ude00"}}',  # escaped, with a surrogate pair
    b'{"cmdid":1,"params":{"q":"a\\"b\\\\c\\/d\\n\\t"}}',
    b'{"cmdid":1,"params":{"k:e:y":"v:a:l","x":"::"}}',  # colons inside strings
    b'{"cmdid":1,"params":{}}\r',  # CRLF framing leaves a \r
    b' {"cmdid":1}',
    b'{"cmdid":1} ',
    b'{"cmdid":1}\t\r',
    b"{}",
    b"[]",
    b'"text"',
    b"123",
    b"null",
    # integers: 64-bit edges, beyond, and Python's 4300-digit limit
    b'{"cmdid":1,"params":{"i":9223372036854775807,"j":-9223372036854775808}}',
    b'{"cmdid":1,"params":{"i":18446744073709551615}}',
    b'{"cmdid":1,"params":{"i":18446744073709551616}}',
    b'{"cmdid":1,"params":{"i":-9223372036854775809}}',
    b'{"cmdid":1,"params":{"i":100000000000000000000000000000}}',
    b'{"cmdid":1,"params":{"i":' + b"9" * 4300 + b"}}",
    b'{"cmdid":1,"params":{"i":' + b"9" * 4301 + b"}}",
    # NaN, infinities, numbers out of range
    b'{"cmdid":1,"params":{"x":NaN}}',
    b'{"cmdid":1,"params":{"x":Infinity}}',
    b'{"cmdid":1,"params":{"x":-Infinity}}',
    b'{"cmdid":1,"params":{"x":1e999}}',
    b'{"cmdid":1,"params":{"x":-1e400}}',
    # duplicate keys, top level and nested, equal or different values, any layout
    b'{"cmdid":1,"cmdid":2}',
    b'{"cmdid":1,"params":{"a":1,"a":1}}',
    b'{"cmdid":1,"params":{"a":1, "a":2}}',
    b'{"cmdid":1,"params":[{"a":{},"a":{}}]}',
    b'{"cmdid":1,"params":{"a":"x","\\u0061":"y"}}',
    # lone surrogates (escaped, and encoded as UTF-8 bytes), invalid UTF-8, BOM
    b'{"cmdid":1,"params":{"s":"\\ud800"}}',
    b'{"cmdid":1,"params":{"s":"\\udc00x"}}',
    b'{"cmdid":1,"params":{"\\ud800":1}}',
    b'{"cmdid":1,"params":{"s":"\xed\xa0\x80"}}',
    b'{"cmdid":1,"params":{"s":"\xff\xfe"}}',
    b'{"cmdid":1,"params":{"s":"\xc0\xaf"}}',  # overlong encoding
    b'\xef\xbb\xbf{"cmdid":1}',
    b'\xc3\xaf\xc2\xbb\xc2\xbf{"cmdid":1}',  # U+00EF U+00BB U+00BF: simplejson's own BOM test
    # nesting around the interpreter's limit and orjson's (1024)
    b'{"cmdid":1,"params":{"d":' + nested(500) + b"}}",
    b'{"cmdid":1,"params":{"d":' + nested(990) + b"}}",
    b'{"cmdid":1,"params":{"d":' + nested(1010) + b"}}",
    b'{"cmdid":1,"params":{"d":' + nested(1020, compact=False) + b"}}",
    b'{"cmdid":1,"params":{"d":' + nested(1100) + b"}}",
    nested(5000),
    # trailing data and plain syntax errors
    b'{"cmdid":1}{"cmdid":2}',
    b'{"cmdid":1} x',
    b'{"cmdid":1,}',
    b"{'cmdid':1}",
    b"{cmdid:1}",
    b'{"cmdid":01}',
    b'{"cmdid":+1}',
    b'{"cmdid":.5}',
    b'{"cmdid":1.}',
    b'{"cmdid":0x10}',
    b'{"cmdid":1 /* c */}',
    b'{"cmdid":"a\x01b"}',  # raw control character
    b'{"cmdid":"a\x00"}',
    b'{"cmdid":1',
    b"",
    b"   ",
    b"\x00",
]


def outcome_of_loads(codec: Any, line: bytes) -> tuple[str, str]:
    """('ok', repr of the value) or ('error', type and message): repr tells 1 from 1.0 and -0.0 from 0.0."""
    try:
        return "ok", repr(codec.loads(line))
    except ValueError as exc:
        return "error", f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("line", LINES, ids=lambda line: repr(line[:48]))
def test_orjson_codec_parses_exactly_like_the_default_codec(line: bytes) -> None:
    assert outcome_of_loads(FAST, line) == outcome_of_loads(EXACT, line)


@pytest.mark.parametrize("codec", [EXACT, FAST], ids=["simplejson", "orjson"])
@pytest.mark.parametrize(("line", "why"), [
    (b'{"cmdid":1,"cmdid":2}', "duplicate key"),
    (b'{"a":{"b":1,"b":1}}', "duplicate key"),
    (b'{"x":NaN}', "NaN"),
    (b'{"x":1e999}', "out of range"),
    (b'\xef\xbb\xbf{"cmdid":1}', "byte order mark"),
    (b'{"s":"\\ud800"}', "surrogates"),
    (b'{"s":"\xff"}', "utf-8"),
    (b'{"i":' + b"9" * 4301 + b"}", "4300"),
    (nested(5000), "nesting"),
    (b'{"cmdid":1} x', "Extra data"),
])
def test_strict_rules_hold_for_every_codec(codec: Any, line: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=f"(?i){why}"):
        codec.loads(line)


def test_big_integers_stay_integers() -> None:
    for codec in (EXACT, FAST):
        assert codec.loads(b'{"i":18446744073709551616}') == {"i": 2**64}
        assert type(codec.loads(b'{"i":18446744073709551616}')["i"]) is int


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Text(str):
    pass


class Number(int):
    pass


class Mapping(dict):  # type: ignore[type-arg]
    pass


class Real(float):
    pass


@dataclasses.dataclass
class Point:
    x: int = 1


class AsDict:
    def _asdict(self) -> dict[str, int]:
        return {"z": 1}


Row = collections.namedtuple("Row", "a b")
cyclic: list[Any] = []
cyclic.append(cyclic)
deep_list: Any = []
for _ in range(300):
    deep_list = [deep_list]
very_deep: Any = []
for _ in range(5000):
    very_deep = [very_deep]

#: Reply values: plain JSON data, and everything one codec could serialize and the other refuse.
VALUES: list[Any] = [
    {"content": "Hello world!"},
    {"a": [1, 2.5, -0.0, 1e16, 0.1, True, False, None, "", {}, []]},
    {"u": "caf\u00e9 \u2028 \U0001f600", "ctrl": "\x00\x1f\"\\/"},
    (1, (2, 3)),
    [None, None],
    {"f": 1.5, "n": None},
    2**63 - 1, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, 10**5000,
    float("nan"), float("inf"), [float("-inf")], {"ok": None, "bad": float("nan")},
    {7: "int key", 2.5: "float key", True: "bool key", None: "none key"},
    {("t",): 1},
    "\ud800", {"s": "\udc00"}, {"\ud800": 1},
    decimal.Decimal("1.25"), {1, 2}, b"bytes", object(),
    Color.RED, Level.HIGH, uuid.UUID(int=1), datetime.datetime(2020, 1, 1), datetime.date(2020, 1, 1),
    Point(), Row(1, [2]), [Row(1, 2)], AsDict(), {"x": AsDict()},
    Text("sub"), {Text("k"): 1}, Number(5), Mapping(a=1), Real(2.5),
    cyclic, {"c": cyclic}, deep_list, very_deep,
]


def outcome_of_dumps(codec: Any, value: Any) -> tuple[str, str]:
    """('ok', the decoded JSON as repr) or ('error', exception type): the JSON value, not its spelling."""
    try:
        text = codec.dumps(value)
    except (ValueError, TypeError) as exc:
        return "error", type(exc).__name__
    return "ok", repr(json.loads(text))


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_orjson_codec_serializes_exactly_like_the_default_codec(value: Any) -> None:
    assert outcome_of_dumps(FAST, value) == outcome_of_dumps(EXACT, value)


@pytest.mark.parametrize("codec", [EXACT, FAST], ids=["simplejson", "orjson"])
def test_reply_encoding_is_the_whole_object_encoded(codec: Any) -> None:
    """encode_reply's prefix shortcut gives the same JSON as encoding the reply object."""
    for cmdid, data, rid, has_id in [(1, {"a": 1}, None, False), (10000, [1, "x"], 7, True),
                                     (-3, "s", "id-\u00e9", True), (2, None, None, True), (5, 10**30, 2**70, True)]:
        line = encode_reply(codec, cmdid, data, rid, has_id)
        assert line.endswith(b"}\n") and line.count(b"\n") == 1
        expected = {"code": 0, "cmdid": cmdid, "id": rid, "data": data} if has_id else \
            {"code": 0, "cmdid": cmdid, "data": data}
        assert json.loads(line) == expected
        assert list(json.loads(line)) == list(expected)  # same key order
    with pytest.raises((ValueError, TypeError)):
        encode_reply(codec, 1, {1, 2})
    with pytest.raises(ValueError):
        encode_reply(codec, 1, [float("nan")], 3, True)


def test_codec_registry_and_errors() -> None:
    assert set(CODECS) == {"simplejson", "orjson"}
    assert isinstance(get_codec("orjson"), OrjsonCodec)
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("yaml")


def test_the_encoder_is_reusable_after_errors() -> None:
    """The C encoder is built once: a failed dump must not leave state that breaks the next one."""
    for bad in (cyclic, {"x": float("nan")}, {"x": object()}):
        with pytest.raises((ValueError, TypeError)):
            EXACT.dumps(bad)
        assert EXACT.dumps({"x": [1, {"y": 2}]}) == b'{"x":[1,{"y":2}]}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans())
def test_property_both_codecs_read_any_json_text_alike(value: Any, separators: tuple[str, str],
                                                      ascii_only: bool) -> None:
    line = json.dumps({"cmdid": 1, "params": {"v": value}}, separators=separators,
                      ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert outcome_of_loads(FAST, line) == outcome_of_loads(EXACT, line)
    assert outcome_of_dumps(FAST, value) == outcome_of_dumps(EXACT, value)


@pytest.mark.parametrize("codec", ["simplejson", "orjson"])
def test_parse_request_gives_the_same_request_with_either_codec(codec: str) -> None:
    line = b'{"cmdid":"10000","timestamp":1.5,"params":{"k":[1]},"id":"x","timeout_ms":5}'
    req = parse_request(line, get_codec(codec))
    assert (req.cmdid, req.timestamp, req.params, req.id, req.has_id, req.timeout_ms) == \
        (10000, 1, {"k": [1]}, "x", True, 5)


def test_servers_with_either_codec_answer_every_line_alike(serve: Any) -> None:
    """Over real sockets: the same byte stream gets the same replies from a simplejson and an orjson server."""
    from tests.support.rawconn import RawConn

    stream = b"".join(line + b"\n" for line in LINES if b"\n" not in line and b"\r" not in line) + \
        b'{"cmdid":1,"id":1,"params":{"x":1.5,"big":18446744073709551616}}\n' + \
        b'{"cmdid":7,"id":2,"params":{"size":3}}\n{"cmdid":4,"id":3}\n'
    replies = {}
    for codec in ("simplejson", "orjson"):
        server = serve(codec=codec)
        with RawConn(server.address, timeout=10) as conn:
            conn.send(stream)
            conn.send(b'{"cmdid":-1,"id":"end"}\n')
            got = []
            while True:
                reply = conn.line()
                if reply.get("id") == "end":
                    break
                got.append(reply)
        replies[codec] = got
    assert len(replies["simplejson"]) > 50
    assert replies["orjson"] == replies["simplejson"]
