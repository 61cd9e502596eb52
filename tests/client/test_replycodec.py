"""ReplyCodec: the client's reply parser is strict on every line, on its fast path and off it."""

import json

import pytest

from geventtcp.client.replycodec import ReplyCodec
from geventtcp.codec import get_codec
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
