"""Property tests (Hypothesis) for the parser, the line splitter and the echo round trip (cases 15, 16)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geventtcp.codec import get_codec
from geventtcp.errors import ProtocolError
from geventtcp.protocol import LineBuffer, Request, parse_request
from tests.support.rawconn import RawConn
from tests.support.servers import serve

CODEC = get_codec("simplejson")

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=10), inner, max_size=5), max_leaves=30)


def _parse_only_request_or_protocol_error(line: bytes) -> None:
    try:
        req = parse_request(line, CODEC, ("127.0.0.1", 1))
    except ProtocolError as exc:
        assert 400 <= exc.code < 500 and isinstance(exc.msg, str)
        json.dumps(exc.msg)
        return
    assert isinstance(req, Request) and type(req.cmdid) is int and type(req.params) is dict


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parse_request_on_arbitrary_bytes(line: bytes) -> None:
    _parse_only_request_or_protocol_error(line)


def _mutations(value: dict[str, Any]) -> st.SearchStrategy[bytes]:
    text = json.dumps(value).encode()
    return st.tuples(st.integers(0, len(text)), st.integers(0, 8), st.binary(max_size=8)).map(
        lambda t: text[:t[0]] + t[2] + text[t[0] + t[1]:])


requests = st.fixed_dictionaries({"cmdid": st.integers(-5, 10**6) | st.text(max_size=5) | st.none()},
                                 optional={"params": json_values, "id": json_values,
                                           "timeout_ms": st.integers(-5, 10**6) | json_scalars,
                                           "timestamp": json_scalars})


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(requests.flatmap(_mutations))
def test_parse_request_on_mutated_requests(line: bytes) -> None:
    _parse_only_request_or_protocol_error(line)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(requests)
def test_valid_requests_parse_to_their_fields(body: dict[str, object]) -> None:
    line = json.dumps(body).encode()
    try:
        req = parse_request(line, CODEC)
    except ProtocolError:
        return
    assert req.params == (body.get("params") or {})
    assert req.has_id == (body.get("id") is not None) and (not req.has_id or req.id == body["id"])


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(4, 30))
def test_linebuffer_split_invariants(lines: list[bytes], cuts: list[int], limit: int) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    buf = LineBuffer(limit)
    out: list[bytes | None] = []
    pos, i = 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        out.extend(buf.feed(stream[pos:pos + n]))
        assert buf.pending < limit  # never holds a line that could not fit
        pos += n
        i += 1
    expected = [line if len(line) < limit else None for line in lines]
    assert out == expected
    assert buf.pending == 0 and not buf.discarding


@pytest.mark.slow
def test_echo_round_trip_over_a_real_socket() -> None:
    with serve() as server, RawConn(server.address) as conn:

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
        def round_trip(params: dict[str, object]) -> None:
            reply = conn.call(1, params, id=1)
            assert reply["code"] == 0
            assert _same(reply["data"], params)

        round_trip()


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=0, abs_tol=0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)
