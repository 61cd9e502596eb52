"""The hostile request lines (reliability cases 4-14): each must get a fast 400 and leave the connection
usable (``tests/reliability/test_hostile_input.py``), and none may block the event loop
(``tests/reliability/test_blocking_guard.py``)."""

from __future__ import annotations

__all__ = ["HOSTILE"]

HOSTILE = {
    "invalid_utf8": b'{"cmdid":1,"params":{"s":"\xff"}}',
    "surrogate_utf8_bytes": b'{"cmdid":1,"params":{"s":"\xed\xa0\x80"}}',
    "overlong_utf8": b'{"cmdid":1,"params":{"s":"\xc0\xaf"}}',
    "bom": b'\xef\xbb\xbf{"cmdid":1}',
    "utf16": '{"cmdid":1}'.encode("utf-16"),
    "utf16le_no_bom": '{"cmdid":1}'.encode("utf-16-le"),
    "utf32": '{"cmdid":1}'.encode("utf-32"),
    "lone_surrogate_escape": b'{"cmdid":1,"params":{"s":"\\ud800"}}',
    "lone_low_surrogate_key": b'{"cmdid":1,"params":{"\\udc00":1}}',
    "nesting_1000": b'{"cmdid":1,"params":{"a":' + b"[" * 1000 + b"]" * 1000 + b"}}",
    "nesting_100000": b'{"cmdid":1,"params":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    "nesting_100000_unclosed": b"[" * 100_000,
    "int_5000_digits": b'{"cmdid":1,"params":{"n":' + b"7" * 5000 + b"}}",
    "int_5000_digits_cmdid": b'{"cmdid":' + b"1" * 5000 + b"}",
    "nan": b'{"cmdid":1,"params":{"x":NaN}}',
    "infinity": b'{"cmdid":1,"params":{"x":Infinity}}',
    "minus_infinity": b'{"cmdid":1,"params":{"x":-Infinity}}',
    "float_overflow": b'{"cmdid":1,"params":{"x":1e999}}',
    "duplicate_keys": b'{"cmdid":1,"cmdid":2}',
    "duplicate_nested_keys": b'{"cmdid":1,"params":{"a":1,"a":2}}',
    "trailing_object": b'{"cmdid":1} {"cmdid":2}',
    "trailing_garbage": b'{"cmdid":1}xyz',
    "truncated": b'{"cmdid":1,"params":',
    "not_object_list": b"[]",
    "not_object_string": b'"x"',
    "not_object_number": b"42",
    "null": b"null",
    "missing_cmdid": b'{"params":{}}',
    "cmdid_object": b'{"cmdid":{}}',
    "cmdid_float": b'{"cmdid":1.5}',
    "cmdid_bool": b'{"cmdid":true}',
    "params_list": b'{"cmdid":1,"params":[]}',
    "id_object": b'{"cmdid":1,"id":{}}',
    "id_float": b'{"cmdid":1,"id":1.5}',
    "timeout_negative": b'{"cmdid":1,"timeout_ms":-5}',
    "timeout_string": b'{"cmdid":1,"timeout_ms":"5"}',
    "nul_byte": b'{"cmdid":1}\x00',
    "control_chars_in_string": b'{"cmdid":1,"params":{"s":"a\x01b"}}',
    "single_quotes": b"{'cmdid':1}",
    "binary_garbage": bytes(range(1, 10)) + bytes(range(11, 256)),
}
