"""request_line: the client's own request encoder writes exactly what protocol.encode_request writes."""

import enum
import time

import pytest

from geventtcp.client.call import DEADLINE_MARGIN, Call, request_line
from geventtcp.codec import get_codec
from geventtcp.errors import NotSent
from geventtcp.protocol import encode_request

CODEC = get_codec("simplejson")


class Cmd(enum.IntEnum):
    FIVE = 5


@pytest.mark.parametrize("cmdid", [-1, 0, 5, Cmd.FIVE, 10**30])
@pytest.mark.parametrize("params", [None, {}, {"a": [1, 2.5, None]}, [1], "caf\u00e9", 0])
@pytest.mark.parametrize("remaining", [1e-6, 0.000999, 0.00999, 0.3, 10.0, 7 * 86400.0])
def test_same_bytes_as_encode_request(monkeypatch, cmdid, params, remaining):
    monkeypatch.setattr("geventtcp.client.call._time", lambda: 1795771957.9)
    now = time.monotonic()
    call = Call(0, now + remaining, False)
    line = request_line(CODEC, cmdid, params, call, 42, now, "x")
    remaining = call.deadline - now  # as the encoder sees it, float rounding included
    timeout_ms = int((remaining - min(DEADLINE_MARGIN, remaining * 0.1)) * 1000) or 1
    assert line == encode_request(CODEC, cmdid, params, 42, timeout_ms, timestamp=1795771957)
    assert (call.id, call.sent, call.size) == (42, now, len(line))


@pytest.mark.parametrize("cmdid", [True, 1.0, "1", None])
def test_non_integer_cmdid_is_a_type_error(cmdid):
    with pytest.raises(TypeError):
        request_line(CODEC, cmdid, None, Call(0, time.monotonic() + 5, False), 1, time.monotonic(), "x")


def test_passed_deadline_is_not_sent_and_leaves_the_call_unnumbered():
    now = time.monotonic()
    call = Call(0, now, False)
    with pytest.raises(NotSent):
        request_line(CODEC, 1, None, call, 9, now, "x")
    assert call.id == 0


@pytest.mark.parametrize("params", [{"x": float("nan")}, {1j: 1}, object()])
def test_params_without_json_form_are_rejected(params):
    with pytest.raises((TypeError, ValueError)):
        request_line(CODEC, 1, params, Call(0, time.monotonic() + 5, False), 1, time.monotonic(), "x")
