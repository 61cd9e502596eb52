"""ReplyCodec: the client's reply parser is strict on every line, on its fast path and off it."""

import json

import pytest

from geventtcp.client.replycodec import ReplyCodec
from geventtcp.codec import OrjsonCodec, get_codec
from geventtcp.errors import ProtocolError


@pytest.fixture(params=["simplejson", "orjson"])
def codec(request):
    return ReplyCodec(get_codec(request.param))


@pytest.mark.parametrize("line", [
    b'{"code":0,"cmdid":-1,"id":7,"data":{"pong":true,"draining":false,"pid":10389,"protocol":1}}',
    b'{"code":0,"id":1,"data":[1,2.5,null,"\\u00e9\\n",{"b":100000000000000000000000000000}]}',
    b'{"code":0,"id":1,"data":"caf\xc3\xa9"}',
    b'{"code":0}  \t',  # trailing whitespace: the full path, still accepted
    b'{"code":0,"a":{"b":{"c":[[[]]]}}}',
])
def test_valid_lines_parse_as_the_stdlib_does(codec, line):
    assert codec.loads(line) == json.loads(line)
    reply = codec.reply(line)
    assert reply == json.loads(line)
    assert [type(v) for v in reply.values()] == [type(v) for v in json.loads(line).values()]


@pytest.mark.parametrize("line", [
    b'{"code":0,"data":NaN}', b'{"code":0,"data":Infinity}', b'{"code":0,"data":-Infinity}',
    b'{"code":0} x', b'{"code":0}{"code":0}', b'{"code":0', b'{"code":0,}', b"{'code':0}",
    b'{"code":0,"data":"\x01"}', b'{"code":0,"data":"\xff"}', b"\xef\xbb\xbf{\"code\":0}",
    b'{"code":0,"data":' + b"[" * 100000 + b"]" * 100000 + b"}",
    b" {\"code\":0} x", b"", b"nope",
])
def test_invalid_lines_are_value_errors_and_protocol_errors(codec, line):
    with pytest.raises(ValueError):
        codec.loads(line)
    with pytest.raises(ProtocolError):
        codec.reply(line)


@pytest.mark.parametrize("line", [b"[1]", b'"x"', b'{"data":1}', b'{"code":"0"}', b'{"code":1.0}', b'{"code":true}'])
def test_reply_needs_an_object_with_an_integer_code(codec, line):
    codec.loads(line)  # valid JSON
    with pytest.raises(ProtocolError):
        codec.reply(line)


@pytest.mark.parametrize("line", [
    b'{"code":0,"id":1,"data":123456789012345678901234567890}',  # orjson alone: a float
    b'{"code":0,"id":1,"data":-9223372036854775809}',
    b'{"code":0,"id":1,"data":[1.5,1e16,0.1,-0.0]}',
    b'{"code":0,"id":1,"data":"\\ud800"}',  # a lone surrogate escape: refused by both
    b'{"code":0,"id":1,"data":"\\ud83d\\ude00 \\n"}',  # a valid pair and other escapes: kept by both
    b'{"code":0,"id":1,"data":' + b"[" * 900 + b"]" * 900 + b"}",  # deep, but within the stdlib's reach
])
def test_orjson_replies_are_exactly_the_default_codecs(line):
    exact, fast = ReplyCodec(get_codec("simplejson")), ReplyCodec(get_codec("orjson"))
    try:
        expected = exact.reply(line)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            fast.reply(line)
        return
    got = fast.reply(line)
    assert got == expected and type(got["data"]) is type(expected["data"])


# -- own_reply: the lone caller's shortcut must give exactly what reply() gives, or decline ----------

def _success(cmdid, rid, data_json):
    return b'{"code":0,"cmdid":%d,"id":%d,"data":%b}' % (cmdid, rid, data_json)


@pytest.mark.parametrize("data_json", [
    b'{"pong":true,"draining":false,"pid":10389,"protocol":1}', b"null", b"0", b"-12.5e3", b'""', b"[]", b"{}",
    b'{"content":"Hello world!"}', b'[1,2.5,null,"\\u00e9\\n",{"b":100000000000000000000000000000}]',
    b'"caf\xc3\xa9"', b'"\\ud83d\\ude00"',  # a valid surrogate pair: the post-check runs and accepts it
    b'{"s":"},\\"id\\":9,\\"data\\":1}"}',  # the envelope's text inside a string
    b'{"a":{"b":{"c":[[[]]]}}}', b'{"k":1,"k":2}',  # duplicate keys: last wins, as in reply()
])
def test_own_reply_is_exactly_reply(data_json):
    codec = ReplyCodec(get_codec("simplejson"))
    line = _success(-1, 7, data_json)
    own = codec.own_reply(line + b"\n", -1, 7)  # one read: the line and its newline
    assert own is not None
    full = codec.reply(line)
    assert own == full and list(own) == list(full)  # same keys, same order
    assert [type(v) for v in own.values()] == [type(v) for v in full.values()]
    assert repr(own) == repr(full)  # float text, nested types


@pytest.mark.parametrize("line", [
    _success(-1, 8, b"1"), _success(2, 7, b"1"),  # another request's reply, another command's
    b'{"code":500,"cmdid":-1,"id":7,"msg":"boom"}',  # errors take the reference path
    b'{"code":0,"cmdid":-1,"data":1,"id":7}',  # another key order (not what our server writes)
    _success(-1, 7, b"1") + b" ",  # trailing whitespace
    _success(-1, 7, b"1,\"x\":2"), _success(-1, 7, b"1}"), _success(-1, 7, b""),  # more after data, none
    _success(-1, 7, b"NaN"), _success(-1, 7, b'"\xff"'), _success(-1, 7, b'"\\ud800"'),  # refused by reply()
    _success(-1, 7, b"[" * 100000 + b"]" * 100000),  # too deep
    b'{"code":0,"cmdid":-1,"id":7,"data":',
    _success(-1, 7, b'{"a":\n1}'),  # a newline as JSON whitespace: the reference path splits the line there
    b'{"code":0,"cmdid":-1,"id":7,"data":{"a":"\xc3\xa9"}',  # no closing brace, a 2-byte character before it
])
def test_own_reply_declines_everything_else(line):
    assert ReplyCodec(get_codec("simplejson")).own_reply(line + b"\n", -1, 7) is None


@pytest.mark.parametrize("codec", ["simplejson", "orjson"])
@pytest.mark.parametrize("read", [
    _success(-1, 7, b"1"),  # no newline: a partial line, held by the line buffer
    _success(-1, 7, b"1") + b"\n" + _success(-1, 8, b"2") + b"\n",  # two lines in one read
    _success(-1, 7, b"1") + b"\n" + b'{"code":0',  # a line and the start of the next
])
def test_own_reply_declines_a_read_that_is_not_exactly_one_line(codec, read):
    assert ReplyCodec(get_codec(codec)).own_reply(read, -1, 7) is None


@pytest.mark.parametrize("line", [
    _success(-1, 7, b'{"pong":true,"draining":false,"pid":10389,"protocol":1}'), _success(-1, 7, b'"\\ud83d\\ude00"'),
    b'{"code":0,"cmdid":-1,"data":1,"id":7}', b'{"code":1005,"cmdid":1,"id":7,"msg":"nope"}',  # any layout, code
])
def test_own_reply_with_orjson_is_exactly_reply(line):
    # orjson parses the whole line (faster than the prefix shortcut): the same loads as reply().
    codec = ReplyCodec(get_codec("orjson"))
    own = codec.own_reply(line + b"\n", -1, 7)
    assert own is not None and own == codec.reply(line) and list(own) == list(codec.reply(line))


@pytest.mark.parametrize("line", [
    _success(-1, 8, b"1"), b'{"code":0,"data":1}', b'{"code":"0","id":7}', b"[1]", _success(-1, 7, b"NaN"),
    _success(-1, 7, b'"\\ud800"'), _success(-1, 7, b"1") + b"x",
])
def test_own_reply_with_orjson_declines_everything_else(line):
    assert ReplyCodec(get_codec("orjson")).own_reply(line + b"\n", -1, 7) is None


def test_own_reply_with_orjson_takes_orjsons_parse_not_the_exact_codecs(monkeypatch):
    # The read's newline must not reach the orjson codec's round-trip check, which would then send
    # every reply through the strict simplejson parse (correct, but the shortcut's point is lost).
    orjson_codec = get_codec("orjson")
    assert isinstance(orjson_codec, OrjsonCodec)
    codec = ReplyCodec(orjson_codec)
    exact_calls = []

    def exact_loads(line):
        exact_calls.append(line)
        return {}

    monkeypatch.setattr(orjson_codec.exact, "loads", exact_loads)
    line = _success(-1, 7, b'{"pong":true,"draining":false,"pid":10389,"protocol":1}')
    own = codec.own_reply(line + b"\n", -1, 7)
    assert own == {"code": 0, "cmdid": -1, "id": 7, "data": {"pong": True, "draining": False, "pid": 10389,
                                                            "protocol": 1}}
    assert exact_calls == []
