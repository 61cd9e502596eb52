"""Hostile and malformed request lines against a real server socket (reliability cases 1-14, 17-19)."""

from __future__ import annotations

import json
import random
import time

import pytest

from geventtcp.log import make_access_hook
from tests.support.hostile import HOSTILE
from tests.support.rawconn import RawConn
from tests.support.servers import serve
from tests.support.system import rss_kib

PING = b'{"cmdid":1,"params":{"ok":1},"id":"next"}\n'


def assert_alive(conn: RawConn) -> None:
    """The same connection still answers a good request."""
    conn.send(PING)
    reply = conn.line()
    assert reply == {"code": 0, "cmdid": 1, "id": "next", "data": {"ok": 1}}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_line_gets_fast_400_and_connection_survives(name: str) -> None:
    with serve() as server, RawConn(server.address) as conn:
        times = []
        for _ in range(2):  # the faster of two: one scheduler pause on a busy host is not the parser
            started = time.monotonic()
            conn.send(HOSTILE[name] + b"\n")
            reply = conn.line()
            times.append(time.monotonic() - started)
            assert reply["code"] == 400, reply
            assert isinstance(reply["msg"], str) and "Traceback" not in reply["msg"]
            assert "data" not in reply
            assert_alive(conn)
        assert min(times) < 0.05, f"{name}: 400 took {min(times) * 1000:.1f} ms"
        assert server.stats.protocol_errors >= 1


def test_id_recovered_in_error_reply_when_valid() -> None:
    with serve() as server, RawConn(server.address) as conn:
        conn.send(b'{"cmdid":1,"id":7,"params":[]}\n')
        assert conn.line() == {"code": 400, "cmdid": 1, "id": 7, "msg": "params must be a JSON object"}
        conn.send(b'{"id":"abc"}\n')
        reply = conn.line()
        assert reply["code"] == 400 and reply["id"] == "abc"


BAD_CMDID = "cmdid must be an integer from -2147483648 to 2147483647"


def test_error_replies_echo_what_was_sent_only_when_valid() -> None:
    """Item 18: an invalid cmdid is answered with ``"cmdid": null`` (never the raw value); ``"id": null``
    is no id (protocol 1.1's rule), so no reply to it carries one; vertical tab and form feed are not blank."""
    with serve() as server, RawConn(server.address) as conn:
        conn.send(b'{"cmdid":"abc","id":1}\n')
        assert conn.line() == {"code": 400, "cmdid": None, "id": 1, "msg": BAD_CMDID}
        conn.send(b'{"cmdid":{"x":1},"id":2}\n')
        assert conn.line() == {"code": 400, "cmdid": None, "id": 2, "msg": BAD_CMDID}
        conn.send(b'{"cmdid":1,"id":null,"params":[]}\n')
        assert conn.line() == {"code": 400, "cmdid": 1, "msg": "params must be a JSON object"}
        conn.send(b'{"cmdid":99,"id":null}\n')
        assert conn.line() == {"code": 404, "cmdid": 99, "msg": "unknown cmdid 99"}
        conn.send(b'{"cmdid":1,"id":null}\n')
        assert conn.line() == {"code": 0, "cmdid": 1, "data": {}}
        for junk in (b"\x0b", b"\x0c", b" \x0c\r"):  # not JSON whitespace: a 400, not silence
            conn.send(junk + b"\n")
            reply = conn.line()
            assert reply["code"] == 400 and reply["cmdid"] is None and "id" not in reply, (junk, reply)
        assert_alive(conn)


def test_valid_json_refused_by_the_strict_parse_keeps_id_and_cmdid() -> None:
    """Item 4: duplicate keys and lone surrogates get a 400 that still carries the id (and cmdid), so a
    client with several requests in flight can tell which one was refused."""
    with serve() as server, RawConn(server.address) as conn:
        conn.send(b'{"cmdid":1,"id":7,"params":{"a":1,"a":2}}\n'
                  b'{"cmdid":1,"id":"s","params":{"s":"\\ud800"}}\n'
                  b'{"cmdid":1,"id":8,"id":9}\n')
        first, second, third = conn.line(), conn.line(), conn.line()
        assert (first["code"], first["cmdid"], first["id"]) == (400, 1, 7)
        assert "duplicate key" in first["msg"]
        assert (second["code"], second["cmdid"], second["id"]) == (400, 1, "s")
        assert third["code"] == 400 and third["cmdid"] == 1 and "id" not in third  # two ids: neither is echoed
        assert_alive(conn)


def test_nesting_within_interpreter_limit_round_trips() -> None:
    """Depth 100 is accepted (we do not cap depth below what the codec can parse and re-encode)."""
    nested: object = []
    for _ in range(100):
        nested = [nested]
    with serve() as server, RawConn(server.address) as conn:
        reply = conn.call(1, {"a": nested}, id=1)
        assert reply["code"] == 0 and reply["data"] == {"a": nested}


def test_big_but_legal_int_and_escaped_surrogate_pair_echo() -> None:
    """A 65-digit int is valid JSON and round-trips; a proper surrogate pair is fine."""
    big = int("9" * 65)
    with serve() as server, RawConn(server.address) as conn:
        conn.send(b'{"cmdid":1,"id":1,"params":{"n":' + str(big).encode() + b',"s":"\\ud83d\\ude00"}}\n')
        reply = conn.line()
        assert reply["data"] == {"n": big, "s": "\U0001F600"}


@pytest.mark.parametrize("kind", ["bigint", "nan", "set", "circular"])
def test_unserializable_result_gets_500_with_id(kind: str) -> None:
    with serve() as server, RawConn(server.address) as conn:
        reply = conn.call(20, {"kind": kind}, id=f"req-{kind}")
        assert reply == {"code": 500, "cmdid": 20, "id": f"req-{kind}", "msg": "result not serializable"}
        assert_alive(conn)


def test_handler_exception_has_no_traceback_on_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    with serve() as server, RawConn(server.address) as conn:
        reply = conn.call(3, id=5)
        assert reply == {"code": 500, "cmdid": 3, "id": 5, "msg": "internal error"}
        assert_alive(conn)
    assert "secret traceback detail" in caplog.text  # logged for the operator, not sent


def test_reply_over_max_reply_bytes_gets_413_with_id() -> None:
    with serve(max_reply_bytes=10_000) as server, RawConn(server.address) as conn:
        reply = conn.call(20, {"kind": "big", "size": 20_000}, id=9)
        assert reply == {"code": 413, "cmdid": 20, "id": 9, "msg": "reply too large"}
        assert conn.call(20, {"kind": "big", "size": 100}, id=10)["code"] == 0


def test_blank_lines_and_crlf() -> None:
    with serve() as server, RawConn(server.address) as conn:
        conn.send(b"\n\r\n   \n\t\r\n" + b'{"cmdid":1,"id":1,"params":{"a":1}}\r\n')
        assert conn.line() == {"code": 0, "cmdid": 1, "id": 1, "data": {"a": 1}}
        assert_alive(conn)


def _corpus() -> tuple[bytes, list[dict[str, object]]]:
    lines, expected = [], []
    for i in range(60):
        if i % 7 == 3:
            lines.append(b'{"cmdid":1,"id":%d,"params":[]}' % i)
            expected.append({"code": 400, "cmdid": 1, "id": i, "msg": "params must be a JSON object"})
        else:
            params = {"i": i, "s": "é" * (i % 5), "pad": "p" * (i * 37 % 300)}
            lines.append(json.dumps({"cmdid": 1, "id": i, "params": params}).encode())
            expected.append({"code": 0, "cmdid": 1, "id": i, "data": params})
    return b"\n".join(lines) + b"\n", expected


@pytest.mark.parametrize("mode", ["all", "lines", "bytes", "rand4", "rand4096"])
def test_split_writes_at_every_boundary(mode: str) -> None:
    payload, expected = _corpus()
    rng = random.Random(mode)
    if mode == "all":
        chunks = [payload]
    elif mode == "lines":
        chunks = [line + b"\n" for line in payload.split(b"\n")[:-1]]
    elif mode == "bytes":
        chunks = [payload[i:i + 1] for i in range(min(len(payload), 3000))]
        chunks.append(payload[3000:])
    else:
        top = 4 if mode == "rand4" else 4096
        chunks, i = [], 0
        while i < len(payload):
            n = rng.randint(1, top)
            chunks.append(payload[i:i + n])
            i += n
    with serve() as server, RawConn(server.address) as conn:
        conn.sock.setsockopt(6, 1, 1)  # TCP_NODELAY: really send tiny segments
        for chunk in chunks:
            conn.send(chunk)
        got = [conn.line() for _ in expected]
        assert got == expected


def test_pipelined_batch_of_1000() -> None:
    payload = b"".join(b'{"cmdid":1,"id":%d,"params":{"n":%d}}\n' % (i, i) for i in range(1000))
    with serve() as server, RawConn(server.address) as conn:
        conn.send(payload)
        for i in range(1000):
            assert conn.line() == {"code": 0, "cmdid": 1, "id": i, "data": {"n": i}}


def test_line_over_limit_gets_413_and_connection_stays_usable() -> None:
    limit = 4096
    with serve(max_line_bytes=limit) as server, RawConn(server.address) as conn:
        conn.send(b'{"cmdid":1,"params":{"s":"' + b"x" * (limit * 3) + b'"}}\n')
        reply = conn.line()
        assert reply["code"] == 413 and reply["cmdid"] is None
        assert_alive(conn)
        # Exactly at the limit (newline included) is accepted (case 18).
        head, tail = b'{"cmdid":1,"id":1,"params":{"s":"', b'"}}\n'
        line = head + b"y" * (limit - len(head) - len(tail)) + tail
        assert len(line) == limit
        conn.send(line)
        assert conn.line()["code"] == 0
        conn.send(head + b"y" * (limit - len(head) - len(tail) + 1) + tail)
        assert conn.line()["code"] == 413
        assert_alive(conn)


def test_one_mib_line_and_garbage_flood_keep_memory_bounded() -> None:
    """Case 17/19: 1 MiB + 1 without newline, then 16 MiB of garbage: one 413, memory bounded, then usable."""
    with serve() as server, RawConn(server.address, timeout=20) as conn:
        before = rss_kib()
        conn.send(b"\x00" + b"g" * (1 << 20))
        reply = conn.line()
        assert reply["code"] == 413
        chunk = b"z" * 65536
        for _ in range(256):  # 16 MiB more of the same unterminated line
            conn.send(chunk)
        conn.send(b"\n")
        assert_alive(conn)
        grown = rss_kib() - before
        assert grown < 8 * 1024, f"RSS grew {grown} KiB"


def test_client_bytes_reach_logs_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """A hostile id (newline, ESC) is logged with %r: one log line, no raw control characters."""
    caplog.set_level("DEBUG", logger="geventtcp")
    evil = "x\n2026-01-01 FAKE LOG LINE\x1b[2J"
    with serve() as server, RawConn(server.address) as conn:
        server.access_log = make_access_hook()
        reply = conn.call(3, id=evil)
        assert reply["code"] == 500 and reply["id"] == evil
        assert conn.call(1, id=evil)["code"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("FAKE LOG LINE" in m for m in messages) >= 3  # handler error + two access lines
    for m in messages:
        assert "\n2026-01-01" not in m and "\x1b" not in m, m
