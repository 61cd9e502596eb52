"""ReplyCodec: the client's reply parser is strict on every line, on its fast path and off it."""

import json

import pytest

from geventtcp.codec import get_codec
from geventtcp.errors import ProtocolError
from geventtcp.replycodec import ReplyCodec

CODEC = ReplyCodec(get_codec("simplejson"))


@pytest.mark.parametrize("line", [
    b'{"code":0,"cmdid":-1,"id":7,"data":{"pong":true,"draining":false,"pid":10389,"protocol":1}}',
    b'{"code":0,"id":1,"data":[1,2.5,null,"\\u00e9\\n",{"b":100000000000000000000000000000}]}',
    b'{"code":0,"id":1,"data":"caf\xc3\xa9"}',
    b'{"code":0}  \t',  # trailing whitespace: the full path, still accepted
    b'{"code":0,"a":{"b":{"c":[[[]]]}}}',
])
def test_valid_lines_parse_as_the_stdlib_does(line):
    assert CODEC.loads(line) == json.loads(line)
    assert CODEC.reply(line) == json.loads(line)


@pytest.mark.parametrize("line", [
    b'{"code":0,"data":NaN}', b'{"code":0,"data":Infinity}', b'{"code":0,"data":-Infinity}',
    b'{"code":0} x', b'{"code":0}{"code":0}', b'{"code":0', b'{"code":0,}', b"{'code':0}",
    b'{"code":0,"data":"\x01"}', b'{"code":0,"data":"\xff"}', b"\xef\xbb\xbf{\"code\":0}",
    b'{"code":0,"data":' + b"[" * 100000 + b"]" * 100000 + b"}",
    b" {\"code\":0} x", b"", b"nope",
])
def test_invalid_lines_are_value_errors_and_protocol_errors(line):
    with pytest.raises(ValueError):
        CODEC.loads(line)
    with pytest.raises(ProtocolError):
        CODEC.reply(line)


@pytest.mark.parametrize("line", [b"[1]", b'"x"', b'{"data":1}', b'{"code":"0"}', b'{"code":1.0}', b'{"code":true}'])
def test_reply_needs_an_object_with_an_integer_code(line):
    CODEC.loads(line)  # valid JSON
    with pytest.raises(ProtocolError):
        CODEC.reply(line)
