"""Request metadata on the wire (``meta``): parsed by ``parse_request``, written by ``encode_request``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from geventtcp.codec import get_codec
from geventtcp.errors import ProtocolError
from geventtcp.protocol import (
    EMPTY_META,
    MAX_META_CHARS,
    MAX_META_ENTRIES,
    encode_meta,
    encode_request,
    meta_problem,
    parse_request,
)

CODEC = get_codec("simplejson")


def line(**fields: Any) -> bytes:
    return json.dumps({"cmdid": 7, "params": {}, **fields}).encode()


def test_a_request_without_meta_has_the_shared_empty_read_only_meta() -> None:
    for raw in (line(), line(meta=None)):
        req = parse_request(raw, CODEC)
        assert req.meta is EMPTY_META
        assert dict(req.meta) == {}
    with pytest.raises(TypeError):
        EMPTY_META["x"] = "y"  # type: ignore[index]


def test_meta_reaches_the_request_as_sent() -> None:
    meta = {"request_id": "r-1", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tenant": "acme",
            "x.custom-key_2": "any printable ~ value"}
    req = parse_request(line(meta=meta, id=5), CODEC)
    assert req.meta == meta
    assert (req.id, req.cmdid) == (5, 7)


@pytest.mark.parametrize(("meta", "reason"), [
    ([], "must be a JSON object"),
    ("request_id=1", "must be a JSON object"),
    ({"Request_Id": "1"}, "keys must be"),
    ({"": "1"}, "keys must be"),
    ({"k" * 65: "1"}, "keys must be"),
    ({"a b": "1"}, "keys must be"),
    ({"request_id": 1}, "must be a string"),
    ({"request_id": None}, "must be a string"),
    ({"request_id": "line\nbreak"}, "printable ASCII"),
    ({"tenant": "M\u00fcller"}, "printable ASCII"),
    ({"tenant": "\x1b[31m"}, "printable ASCII"),
    ({f"k{i}": "v" for i in range(MAX_META_ENTRIES + 1)}, "more than 32 entries"),
    ({"a": "x" * MAX_META_CHARS}, "longer than 8192"),
])
def test_a_meta_that_breaks_a_rule_is_a_400_with_the_requests_id_and_cmdid(meta: Any, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line(meta=meta, id="abc"), CODEC)
    assert info.value.code == 400
    assert reason in info.value.msg
    assert (info.value.id, info.value.has_id, info.value.cmdid) == ("abc", True, 7)


def test_the_limits_themselves_are_accepted() -> None:
    at_entries = {f"k{i}": "v" for i in range(MAX_META_ENTRIES)}
    at_chars = {"a": "x" * (MAX_META_CHARS - 1)}
    key64 = {"k" * 64: ""}
    for meta in (at_entries, at_chars, key64, {}):
        assert meta_problem(meta) is None
        assert parse_request(line(meta=meta), CODEC).meta == meta


def test_the_error_message_never_quotes_a_bad_value() -> None:
    """The 400's msg goes back to the client: a lone surrogate in it would make the reply unreadable."""
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"cmdid":7,"meta":{"tenant":"\\u00e9\\u0007"}}', CODEC)
    assert info.value.msg.isascii() and "\x07" not in info.value.msg


def test_encode_request_writes_meta_and_the_server_parses_it_back() -> None:
    raw = encode_request(CODEC, 7, {"a": 1}, id=3, meta={"request_id": "r-9"})
    req = parse_request(raw.rstrip(b"\n"), CODEC)
    assert req.meta == {"request_id": "r-9"} and req.params == {"a": 1} and req.id == 3
    assert b"meta" not in encode_request(CODEC, 7, {}, meta={})  # empty: the field is left out
    with pytest.raises(ValueError, match="printable ASCII"):
        encode_meta(CODEC, {"tenant": "\n"})
