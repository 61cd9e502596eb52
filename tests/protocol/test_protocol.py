"""The sans-IO protocol module alone: framing at every split point, parsing, encoding; no sockets."""

from __future__ import annotations

import ast
import json
import os
from typing import Any

import pytest

from geventtcp import protocol
from geventtcp.codec import SimplejsonCodec
from geventtcp.errors import Code, ProtocolError
from geventtcp.protocol import (
    LineBuffer,
    decode_reply,
    encode_error,
    encode_goaway,
    encode_reply,
    encode_request,
    parse_request,
)

CODEC = SimplejsonCodec()
STREAM = (
    b'{"cmdid":1,"timestamp":1,"params":{"a":"x\\ny"},"id":1}\n'
    b'{"cmdid":"2","params":{}}\r\n'
    b"\n"
    b"  \r\n"
    b'{"cmdid":10000,"timestamp":1700000000,"params":{"k":[1,2,3]}}\n'
)
EXPECTED = [
    b'{"cmdid":1,"timestamp":1,"params":{"a":"x\\ny"},"id":1}',
    b'{"cmdid":"2","params":{}}\r',
    b"",
    b"  \r",
    b'{"cmdid":10000,"timestamp":1700000000,"params":{"k":[1,2,3]}}',
]


def feed_all(buf: LineBuffer, chunks: list[bytes]) -> list[bytes | None]:
    lines: list[bytes | None] = []
    for chunk in chunks:
        lines.extend(buf.feed(chunk))
    return lines


def test_whole_stream_in_one_chunk() -> None:
    assert LineBuffer().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_every_split_point(cut: int) -> None:
    buf = LineBuffer()
    assert feed_all(buf, [STREAM[:cut], STREAM[cut:]]) == EXPECTED
    assert buf.pending == 0


def test_one_byte_at_a_time() -> None:
    buf = LineBuffer()
    assert feed_all(buf, [STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_pipelined_many_lines_in_one_chunk() -> None:
    line = b'{"cmdid":1,"params":{"n":0}}\n'
    assert LineBuffer().feed(line * 10000) == [line[:-1]] * 10000


def test_partial_line_is_held() -> None:
    buf = LineBuffer()
    assert buf.feed(b'{"cmdid":') == []
    assert buf.pending == 9
    assert buf.feed(b"1}\n") == [b'{"cmdid":1}']
    assert buf.pending == 0


def test_line_exactly_at_the_limit_passes() -> None:
    buf = LineBuffer(max_line_bytes=16)
    line = b"x" * 15 + b"\n"  # 16 bytes with the newline
    assert buf.feed(line) == [b"x" * 15]


def test_complete_line_over_the_limit_is_none() -> None:
    buf = LineBuffer(max_line_bytes=16)
    assert buf.feed(b"x" * 16 + b"\nok\n") == [None, b"ok"]


def test_unfinished_line_over_the_limit_is_dropped_to_its_newline() -> None:
    buf = LineBuffer(max_line_bytes=16)
    assert buf.feed(b"y" * 20) == [None]
    assert buf.pending == 0 and buf.discarding
    assert buf.feed(b"y" * 1000) == []  # never buffered
    assert buf.pending == 0
    assert buf.feed(b"yyy\nnext\n") == [b"next"]
    assert not buf.discarding


def test_long_line_split_across_chunks_reports_once() -> None:
    buf = LineBuffer(max_line_bytes=8)
    out = feed_all(buf, [b"abcd", b"efgh", b"ijkl", b"\nz\n"])
    assert out == [None, b"z"]


def test_skip_blank_drops_and_counts_blank_lines() -> None:
    """Item 3: blank lines (only space, tab, CR) never become list items on the request side; \\v and \\f
    are not JSON whitespace, so such a line stays a line (and gets its 400)."""
    buf = LineBuffer(skip_blank=True)
    assert buf.feed(b"\n\r\n \t \r\n" + b'{"cmdid":1}\r\n' + b"\x0b\n\x0c\n\n") == [b'{"cmdid":1}\r', b"\x0b", b"\x0c"]
    assert (buf.blank_lines, buf.blank_run) == (4, 1)
    assert buf.feed(b"\n" * 70000) == [] and (buf.blank_lines, buf.blank_run) == (70004, 70001)
    long_line = b'{"cmdid":1,"params":{"pad":"xxxxxxxxxxxx"}}'
    assert buf.feed(long_line + b"\n") == [long_line]
    assert buf.blank_run == 0  # a read of long lines: not searched, and no blank run goes on
    assert buf.feed(b"\n" * 5) == [] and buf.blank_run == 5
    assert buf.feed(b"  \n" + b"x\n" + b"\r\n\r\n") == [b"x"]
    assert buf.blank_run == 2 and buf.blank_lines == 70004 + 5 + 3
    assert LineBuffer().feed(b"\n \n") == [b"", b" "]  # the client side keeps every line


def test_too_long_line_states_the_limit_it_was_cut_at() -> None:
    buf = LineBuffer(16, skip_blank=True)
    assert buf.feed(b"x" * 40 + b"\n") == [None]
    buf.max_line_bytes = 1024  # raised after the feed (AUTH): the answer is still about 16
    assert buf.cut_limit == 16


def test_parse_seed_format_request() -> None:
    req = parse_request(b'{"cmdid":10000,"timestamp":1700000000,"params":{"a":1}}', CODEC, ("1.2.3.4", 5))
    assert (req.cmdid, req.timestamp, req.params, req.id, req.has_id) == (10000, 1700000000, {"a": 1}, None, False)
    assert req.address == ("1.2.3.4", 5)
    assert req.rawBody == '{"cmdid":10000,"timestamp":1700000000,"params":{"a":1}}'


def test_parse_defaults_and_digit_string_cmdid() -> None:
    req = parse_request(b'{"cmdid":"42"}\r', CODEC)
    assert req.cmdid == 42 and req.params == {} and isinstance(req.timestamp, int) and req.timestamp > 1_600_000_000
    assert req.rawBody == '{"cmdid":"42"}'


def test_parse_keeps_id_and_ignores_unknown_fields() -> None:
    req = parse_request(b'{"cmdid":1,"id":"abc","extra":[1],"timeout_ms":250}', CODEC)
    assert req.id == "abc" and req.has_id and req.timeout_ms == 250 and req.deadline is not None


@pytest.mark.parametrize(
    ("line", "fragment", "rid", "cmdid"),
    [
        (b"not json", "invalid JSON", None, None),
        (b"[1,2]", "must be a JSON object", None, None),
        (b'"text"', "must be a JSON object", None, None),
        (b'{"params":{}}', "missing cmdid", None, None),
        (b'{"cmdid":"abc","id":3}', "cmdid must be an integer", 3, None),  # an invalid cmdid is never echoed
        (b'{"cmdid":"' + b"9" * 30 + b'","id":"x"}', "cmdid must be an integer", "x", None),
        (b'{"cmdid":1.5}', "cmdid must be an integer", None, None),
        (b'{"cmdid":true}', "cmdid must be an integer", None, None),
        (b'{"cmdid":1,"params":[1],"id":9}', "params must be a JSON object", 9, 1),
        (b'{"cmdid":1,"id":{"a":1}}', "id must be an integer from", None, 1),
        (b'{"cmdid":1,"id":9007199254740992}', "id must be an integer from", None, 1),
        (b'{"cmdid":1,"id":"%s"}' % (b"x" * 257), "or a string of at most 256 characters", None, 1),
        (b'{"cmdid":2147483648,"id":1}', "cmdid must be an integer from -2147483648 to 2147483647", 1, None),
        (b'{"cmdid":"99999999999","id":1}', "cmdid must be an integer from", 1, None),
        (b'{"cmdid":1,"timestamp":9223372036854775808,"id":1}', "timestamp must be an integer from", 1, 1),
        (b'{"cmdid":1,"timestamp":1e300,"id":1}', "timestamp must be an integer from", 1, 1),
        (b'{"cmdid":1,"timestamp":"x"}', "timestamp must be an integer", None, 1),
        (b'{"cmdid":1,"timeout_ms":-5}', "timeout_ms must be an integer from 1", None, 1),
        (b'{"cmdid":1,"timeout_ms":2147483648}', "timeout_ms must be an integer from 1", None, 1),
        (b'{"cmdid":1} {"cmdid":2}', "invalid JSON", None, None),
        (b'\xef\xbb\xbf{"cmdid":1}', "byte order mark", None, None),
        (b'{"cmdid":1,"params":{"s":"\xff"}}', "invalid JSON", None, None),
        (b'{"cmdid":1,"params":{"s":"\xed\xa0\x80"}}', "invalid JSON", None, None),
        ('{"cmdid":1}'.encode("utf-16"), "invalid JSON", None, None),
        (b'{"cmdid":1,"params":{"s":"\\ud800"}}', "invalid JSON", None, 1),
        (b'{"cmdid":1,"params":{"n":NaN}}', "invalid JSON", None, None),
        (b'{"cmdid":1,"params":{"n":-Infinity}}', "invalid JSON", None, None),
        (b'{"cmdid":1,"params":{"n":1e999}}', "out of range", None, 1),
        (b'{"cmdid":1,"params":{"n":' + b"9" * 5000 + b"}}", "invalid JSON", None, None),
        (b'{"cmdid":1,"cmdid":2}', "duplicate key", None, None),
        (b'{"cmdid":1,"params":{"a":1,"a":2}}', "duplicate key", None, 1),
        (b"[" * 100000 + b"]" * 100000, "nesting too deep", None, None),
    ],
)
def test_invalid_requests(line: bytes, fragment: str, rid: object, cmdid: object) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line, CODEC)
    assert fragment in info.value.msg
    assert info.value.code == Code.BAD_REQUEST
    assert (info.value.id, info.value.cmdid) == (rid, cmdid)


def test_id_null_is_no_id() -> None:
    """``"id": null`` is the same as no id (protocol 1.1's clean rule: languages that cannot tell null
    from absent must be able to match): the reply, error or not, carries no id."""
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"cmdid":1,"id":null,"params":[]}', CODEC)
    assert (info.value.id, info.value.has_id, info.value.cmdid) == (None, False, 1)
    req = parse_request(b'{"cmdid":1,"id":null}', CODEC)
    assert (req.id, req.has_id) == (None, False)


def test_ids_and_cmdids_at_their_limits_are_accepted() -> None:
    for line, rid, cmdid in [(b'{"cmdid":2147483647,"id":9007199254740991}', 2**53 - 1, 2**31 - 1),
                             (b'{"cmdid":-2147483648,"id":-9007199254740991}', -(2**53 - 1), -(2**31)),
                             (b'{"cmdid":1,"id":"%s"}' % (b"x" * 256), "x" * 256, 1)]:
        req = parse_request(line, CODEC)
        assert (req.id, req.cmdid, req.has_id) == (rid, cmdid, True)


@pytest.mark.parametrize(
    ("line", "fragment", "rid", "has_id", "cmdid"),
    [
        (b'{"cmdid":1,"id":7,"params":{"a":1,"a":2}}', "duplicate key", 7, True, 1),
        (b'{"cmdid":"12","id":"k","params":{"s":"\\ud800"}}', "invalid JSON", "k", True, 12),
        (b'{"params":{"\\udc00":1},"id":null,"cmdid":5}', "invalid JSON", None, False, 5),  # null is no id
        (b'{"params":{"a":1,"a":2},"id":9007199254740992,"cmdid":5}', "duplicate key", None, False, 5),
        (b'{"params":{"a":1,"a":2},"id":1,"cmdid":2147483648}', "duplicate key", 1, True, None),
        (b'{"cmdid":1,"id":1,"id":2}', "duplicate key", None, False, 1),  # which id? none is echoed
        (b'{"cmdid":1,"cmdid":2,"id":3}', "duplicate key", 3, True, None),
        (b'{"cmdid":1,"id":"\\ud800"}', "invalid JSON", None, False, 1),  # a lone surrogate id is unreadable
        (b'{"cmdid":1,"id":9,"params":{"n":NaN}}', "invalid JSON", None, False, None),  # not JSON at all
        (b'{"cmdid":1,"id":9,"params":{"a":1,"a":2}} x', "invalid JSON", None, False, None),
    ],
)
def test_ids_recovered_from_valid_json_that_is_refused(line: bytes, fragment: str, rid: object, has_id: bool,
                                                        cmdid: object) -> None:
    """Item 4: duplicate keys or lone surrogates are refused, but the 400 still carries id and cmdid."""
    with pytest.raises(ProtocolError) as info:
        parse_request(line, CODEC)
    assert fragment in info.value.msg
    assert (info.value.id, info.value.has_id, info.value.cmdid) == (rid, has_id, cmdid)


def test_valid_surrogate_pair_is_accepted() -> None:
    req = parse_request(b'{"cmdid":1,"params":{"s":"\\ud83d\\ude00"}}', CODEC)
    assert req.params == {"s": "\U0001f600"}


def test_reply_line_shapes() -> None:
    ok = json.loads(encode_reply(CODEC, 1, {"a": "\n"}, 7, True))
    assert ok == {"code": 0, "cmdid": 1, "id": 7, "data": {"a": "\n"}}
    assert "id" not in json.loads(encode_reply(CODEC, 1, None))
    err = encode_error(CODEC, Code.UNKNOWN_COMMAND, "unknown cmdid 9", 9, None, True)
    assert err.endswith(b"\n") and err.count(b"\n") == 1
    assert json.loads(err) == {"code": 404, "cmdid": 9, "id": None, "msg": "unknown cmdid 9"}
    assert json.loads(encode_goaway(CODEC, "idle"))["goaway"] == "idle"


def test_reply_never_contains_a_raw_newline_and_escapes_surrogates() -> None:
    line = encode_reply(CODEC, 1, {"s": "a\nb\u2028\U0001f600", "t": "\\ud800"})
    assert line.count(b"\n") == 1 and line.isascii()
    assert json.loads(line)["data"] == {"s": "a\nb\u2028\U0001f600", "t": "\\ud800"}
    for lone in ("\ud800", "x\udfff", "\ude00\ud83d"):  # the client's strict reply codec would refuse these
        with pytest.raises(ValueError):
            encode_reply(CODEC, 1, {"s": lone}, "id", True)


def test_unserializable_results_raise() -> None:
    for bad in ({1}, float("nan"), 10**5000, object()):
        with pytest.raises((ValueError, TypeError)):
            encode_reply(CODEC, 1, bad)


def test_error_reply_survives_unencodable_id() -> None:
    line = encode_error(CODEC, 500, "x", cmdid=float("nan"), id=float("inf"), has_id=True)
    assert json.loads(line) == {"code": 500, "cmdid": None, "id": None, "msg": "x"}


def test_decode_reply() -> None:
    assert decode_reply(CODEC, b'{"code":0,"data":1}') == {"code": 0, "data": 1}
    with pytest.raises(ProtocolError):
        decode_reply(CODEC, b'{"data":1}')
    with pytest.raises(ProtocolError):
        decode_reply(CODEC, b"nope")


def test_encode_request_round_trip() -> None:
    line = protocol.encode_request(CODEC, 5, {"a": 1}, id=3, timeout_ms=1500, timestamp=10)
    req = parse_request(line.rstrip(b"\n"), CODEC)
    assert (req.cmdid, req.params, req.id, req.timeout_ms, req.timestamp) == (5, {"a": 1}, 3, 1500, 10)


def test_protocol_module_is_sans_io() -> None:
    source = open(os.path.join(os.path.dirname(protocol.__file__), "protocol.py")).read()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "gevent", "logging", "select", "ssl"}


def test_wire_facts_are_defined_once_here_and_used_by_both_sides() -> None:
    """Reserved cmdids, the pre-auth limits and the goaway marker live in protocol.py; the server's
    modules re-export them (old imports keep working) and the client reads the same definitions."""
    from geventtcp.client.replycodec import unsolicited
    from geventtcp.errors import Unprocessed
    from geventtcp.server import builtins, security

    assert [(b.name, int(b)) for b in protocol.Builtin] == [("PING", -1), ("LIST", -2), ("STATS", -3), ("AUTH", -4),
                                                            ("HELLO", -5)]
    assert builtins.Builtin is protocol.Builtin
    assert protocol.PREAUTH_CMDIDS == (protocol.Builtin.AUTH, protocol.Builtin.PING, protocol.Builtin.HELLO)
    assert protocol.READ_ONLY_BUILTINS == {-1, -2, -3}
    assert security.PREAUTH_MAX_LINE_BYTES is protocol.PREAUTH_MAX_LINE_BYTES == 64 * 1024
    goaway = decode_reply(CODEC, encode_goaway(CODEC, "reload"))
    assert goaway[protocol.GOAWAY_FIELD] == "reload"
    assert unsolicited(goaway) == ("server is going away (reload): server is going away (reload)", Unprocessed)


# -- protocol 1.1: HELLO -----------------------------------------------------------------------


def test_hello_params_ask_for_the_features_this_implementation_offers() -> None:
    assert protocol.hello_params() == {"protocol": "1.1", "features": ["unordered"]}
    assert protocol.hello_params(()) == {"protocol": "1.1", "features": []}


@pytest.mark.parametrize(("params", "in_force", "features"), [
    ({"protocol": "1.1", "features": ["unordered"]}, frozenset(), ["unordered"]),
    ({"features": ["unordered", "compression", "unordered"]}, frozenset(), ["unordered"]),  # unknown ignored
    ({"protocol": "1.1"}, frozenset(), []),  # no features asked: nothing switched on
    ({}, frozenset(), []),
    ({"protocol": "2.0", "features": []}, frozenset(), []),  # a newer client: the server states its own
    ({"features": []}, frozenset({"unordered"}), ["unordered"]),  # once on, stays on
])
def test_negotiate_switches_on_the_known_features_asked_for(params: dict[str, Any], in_force: frozenset[str],
                                                           features: list[str]) -> None:
    data, now = protocol.negotiate(params, in_force)
    assert data == {"protocol": "1.1", "features": features}
    assert now == frozenset(features)


@pytest.mark.parametrize("params", [
    {"features": "unordered"}, {"features": [1]}, {"features": None}, {"protocol": 1.1}, {"protocol": ["1.1"]},
])
def test_negotiate_refuses_params_of_the_wrong_type(params: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.negotiate(params)
    assert err.value.code == 400


@pytest.mark.parametrize(("line", "features"), [
    (b'{"code":0,"cmdid":-5,"id":1,"data":{"protocol":"1.1","features":["unordered"],"pid":7}}', {"unordered"}),
    (b'{"code":0,"cmdid":-5,"id":1,"data":{"protocol":"1.1","features":[]}}', set()),
    (b'{"code":404,"cmdid":-5,"id":1,"msg":"unknown cmdid -5"}', set()),  # a server before 1.1
    (b'{"code":401,"cmdid":-5,"id":1,"msg":"authentication required"}', set()),  # a 1.0 server with auth on
    (b'{"code":0,"cmdid":-5,"id":1,"data":null}', set()),  # anything unexpected: request order
    (b'{"code":0,"cmdid":-5,"id":1,"data":{"features":"unordered"}}', set()),
    (b'{"code":0,"cmdid":-5,"id":1,"data":{"features":["unordered",3]}}', {"unordered"}),
])
def test_accepted_features_reads_a_hello_reply_and_falls_back_to_request_order(line: bytes,
                                                                               features: set[str]) -> None:
    assert protocol.accepted_features(decode_reply(CODEC, line)) == features


def test_a_hello_round_trip_from_request_line_to_reply_line() -> None:
    line = encode_request(CODEC, protocol.Builtin.HELLO, protocol.hello_params(), id=1)
    req = protocol.parse_request(line[:-1], CODEC)
    data, now = protocol.negotiate(req.params)
    reply = encode_reply(CODEC, req.cmdid, data, req.id, req.has_id)
    assert reply == b'{"code":0,"cmdid":-5,"id":1,"data":{"protocol":"1.1","features":["unordered"]}}\n'
    assert protocol.accepted_features(decode_reply(CODEC, reply[:-1])) == now == {protocol.UNORDERED}


@pytest.mark.parametrize("ts", [-(2**63), -(2**63) + 1, 2**63 - 1, "9223372036854775807"])
def test_timestamp_takes_the_whole_signed_64_bit_range(ts: object) -> None:
    """Review round 3: the spec says -2^63 to 2^63-1 (a signed 64-bit integer), but -2^63 (Go's and
    Java's minimum) was refused: the check was symmetric around -(2^63-1)."""
    line = b'{"cmdid":1,"timestamp":%s,"id":1}' % json.dumps(ts).encode()
    req = parse_request(line, CODEC)
    assert req.timestamp == int(ts)  # type: ignore[call-overload]
    with pytest.raises(ProtocolError, match=r"timestamp must be an integer from -9223372036854775808 to"):
        parse_request(b'{"cmdid":1,"timestamp":-9223372036854775809,"id":1}', CODEC)
