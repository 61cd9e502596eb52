"""Shared-secret AUTH, protected mode and the per-peer connection limit, over real sockets."""

from __future__ import annotations

import hmac
import json
import logging
import os
import subprocess
import sys
import time

import gevent
import pytest

from geventtcp.errors import ConfigError
from geventtcp.server import security
from geventtcp.server.builtins import Builtin
from geventtcp.server.server import Server
from tests.support.apps import make_registry
from tests.support.rawconn import RawConn
from tests.support.servers import serve
from tests.support.system import ROOT, non_loopback_ip, wait_until

TOKEN = "s3cret-token-\u00e9"


def test_commands_before_auth_get_401_and_ping_is_allowed() -> None:
    with serve(auth_token=TOKEN) as server, RawConn(server.address) as conn:
        assert conn.call(1, {"a": 1}, id=1) == {"code": 401, "cmdid": 1, "id": 1, "msg": "authentication required"}
        assert conn.call(999, id=2)["code"] == 401  # unknown cmdids do not leak as 404 before auth
        assert conn.call(Builtin.STATS)["code"] == 401
        assert conn.call(Builtin.PING)["data"]["pong"] is True  # health checks need no secret
        reply = conn.call(Builtin.AUTH, {"token": TOKEN}, id=3)
        assert reply == {"code": 0, "cmdid": -4, "id": 3, "data": {"authenticated": True, "required": True}}
        assert conn.call(1, {"a": 1}, id=4) == {"code": 0, "cmdid": 1, "id": 4, "data": {"a": 1}}
        assert conn.call(999)["code"] == 404


GOAWAY_AUTH_FAILED = {"code": 401, "cmdid": None, "goaway": "auth_failed", "msg": "authentication failed 3 times"}


def test_three_wrong_tokens_close_the_connection() -> None:
    with serve(auth_token=TOKEN) as server, RawConn(server.address) as conn:
        for attempt, params in enumerate(({"token": "wrong"}, {}, {"token": 12345})):
            reply = conn.call(Builtin.AUTH, params, id=attempt)
            assert reply == {"code": 401, "cmdid": -4, "id": attempt, "msg": "invalid credentials"}
        assert conn.line() == GOAWAY_AUTH_FAILED  # the close is announced, as every close is
        conn.expect_eof(timeout=3)
        assert server.stats.auth_failures == 3
    with serve(auth_token=TOKEN) as server, RawConn(server.address) as conn:  # pipelined: same outcome
        conn.send(b'{"cmdid":-4,"params":{"token":"x"}}\n' * 3 + b'{"cmdid":1,"id":"after"}\n')
        codes = [conn.line()["code"] for _ in range(3)]
        assert codes == [401, 401, 401]
        # The request read in the same batch is not dispatched: it gets no reply, and the going-away
        # line tells the client that a request left unanswered was not processed.
        assert conn.line() == GOAWAY_AUTH_FAILED
        conn.expect_eof(timeout=3)
        assert conn.buf == b""


def test_auth_limit_stops_the_batch_and_only_the_first_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Item 11: 900 AUTH lines in one packet got 899 failures answered and the right token at #500 then
    worked. Now nothing after the third failure is dispatched, and one warning per connection is logged
    (the failures are counted in ``auth_failures``)."""
    caplog.set_level(logging.WARNING, logger="geventtcp")
    lines = [b'{"cmdid":-4,"id":%d,"params":{"token":"wrong"}}\n' % i for i in range(900)]
    lines[500] = json.dumps({"cmdid": -4, "id": 500, "params": {"token": TOKEN}}).encode() + b"\n"
    with serve(auth_token=TOKEN) as server:
        with RawConn(server.address) as conn:
            conn.send(b"".join(lines))
            for i in range(3):
                assert conn.line() == {"code": 401, "cmdid": -4, "id": i, "msg": "invalid credentials"}
            assert conn.line() == GOAWAY_AUTH_FAILED
            conn.expect_eof()
            assert conn.buf == b""  # nothing else was answered, the good token least of all
        assert server.stats.auth_failures == 3
        with RawConn(server.address) as conn:  # one at a time: the same, and a warning of its own
            for i in range(3):
                assert conn.call(Builtin.AUTH, {"token": "nope"}, id=i)["code"] == 401
            conn.expect_eof()
        wait_until(lambda: server.stats.auth_failures == 6 and not server.connections)
    warnings = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(warnings) == 2, warnings


def test_second_connection_must_authenticate_too() -> None:
    with serve(auth_token=TOKEN) as server, RawConn(server.address) as a, RawConn(server.address) as b:
        assert a.call(Builtin.AUTH, {"token": TOKEN})["code"] == 0
        assert b.call(1)["code"] == 401
        assert a.call(1)["code"] == 0


def test_preauth_line_limit_is_small() -> None:
    big = b'{"cmdid":1,"params":{"s":"' + b"x" * 100_000 + b'"}}\n'
    with serve(auth_token=TOKEN) as server, RawConn(server.address) as conn:
        conn.send(big)
        # 64 KiB before auth, and the 413 says so (item 18: it stated the 1 MiB limit)
        assert conn.line() == {"code": 413, "cmdid": None, "msg": "request line longer than 65536 bytes"}
        assert conn.call(Builtin.AUTH, {"token": TOKEN})["code"] == 0
        conn.send(big)
        assert conn.line()["code"] == 0  # the normal 1 MiB limit after
        conn.send(b'{"cmdid":1,"params":{"s":"' + b"x" * (1 << 20) + b'"}}\n')
        assert conn.line() == {"code": 413, "cmdid": None, "msg": "request line longer than 1048576 bytes"}


def test_token_file(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "token"  # type: ignore[operator]
    path.write_text(f"  {TOKEN}\n")
    with serve(auth_token_file=str(path)) as server, RawConn(server.address) as conn:
        assert conn.call(Builtin.AUTH, {"token": TOKEN})["code"] == 0
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        Server(make_registry(), bind="127.0.0.1:0", auth_token_file=str(path))
    with pytest.raises(ConfigError, match="not both"):
        Server(make_registry(), bind="127.0.0.1:0", auth_token="a", auth_token_file=str(path))


def test_auth_without_configured_token_succeeds_and_says_so() -> None:
    with serve() as server, RawConn(server.address) as conn:
        assert conn.call(Builtin.AUTH, {"token": "anything"})["data"] == {"authenticated": True, "required": False}


def test_token_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("geventtcp.server.security.hmac.compare_digest", spy)
    with serve(auth_token=TOKEN) as server, RawConn(server.address) as conn:
        conn.call(Builtin.AUTH, {"token": "s3cret"})
        conn.call(Builtin.AUTH, {"token": TOKEN})
    assert calls == [(b"s3cret", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_protected_mode_refuses_public_bind_without_auth() -> None:
    with pytest.raises(ConfigError, match="protected mode: refusing to listen on 0.0.0.0"):
        Server(make_registry(), bind="0.0.0.0:0").start()
    for settings in ({"auth_token": TOKEN}, {"protected_mode": False}):
        server = Server(make_registry(), bind="0.0.0.0:0", **settings)
        server.start()
        server.close()


@pytest.mark.subprocess
def test_protected_mode_cli_message() -> None:
    proc = subprocess.run([sys.executable, "-m", "geventtcp", "serve", "handlers", "-b", "0.0.0.0:0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "protected mode" in proc.stderr and "--no-protected-mode" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_protected_mode_denies_non_loopback_peer_at_runtime() -> None:
    source = non_loopback_ip()
    if source is None and not os.environ.get("CI"):  # CI's machines have one: there it must run
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    assert source is not None, "no non-loopback IPv4 address on this host"
    with serve() as server:
        with RawConn(server.address, source=source) as conn:
            reply = conn.line()
            assert reply["code"] == 403 and "protected mode" in reply["msg"]
            conn.expect_eof()
        with RawConn(server.address, source="127.0.0.2") as conn:  # all of 127/8 is loopback
            assert conn.call(-1)["code"] == 0
    with serve(auth_token=TOKEN) as server, RawConn(server.address, source=source) as conn:
        assert conn.call(1)["code"] == 401  # with auth on, the peer may try to authenticate
        assert conn.call(Builtin.AUTH, {"token": TOKEN})["code"] == 0


def test_is_loopback() -> None:
    assert security.is_loopback(("127.0.0.5", 1)) and security.is_loopback(("::1", 1, 0, 0))
    assert security.is_loopback(("::ffff:127.0.0.1", 1, 0, 0)) and security.is_loopback("/tmp/sock")
    assert not security.is_loopback(("0.0.0.0", 1)) and not security.is_loopback(("::", 1, 0, 0))
    assert not security.is_loopback(("10.1.2.3", 1)) and not security.is_loopback(("::ffff:10.0.0.1", 1, 0, 0))


def test_per_peer_connection_limit() -> None:
    with serve(max_connections_per_peer=3) as server:
        conns = [RawConn(server.address) for _ in range(3)]
        for c in conns:
            assert c.call(-1)["code"] == 0
        with RawConn(server.address) as extra:
            assert extra.line() == {"code": 503, "cmdid": None, "goaway": "overloaded",
                                    "msg": "too many connections from peer"}
            extra.expect_eof()
        with RawConn(server.address, source="127.0.0.2") as other:  # another peer is unaffected
            assert other.call(-1)["code"] == 0
        for c in conns:
            assert c.call(1, {"still": "served"})["code"] == 0
        conns.pop().close()
        wait_until(lambda: server.peers.get("127.0.0.1") == 2)
        with RawConn(server.address) as again:
            assert again.call(-1)["code"] == 0
        for c in conns:
            c.close()
        wait_until(lambda: not server.peers)
        assert server.stats.connections_rejected == 1


def test_per_peer_limit_is_off_by_default() -> None:
    """Behind a load balancer (or one host with a big pool) every connection has one peer address:
    a default per-peer limit refused connection 257 (and then the balancer's health check)."""
    with serve() as server:
        conns = [RawConn(server.address) for _ in range(300)]
        try:
            for c in conns:
                c.send(b'{"cmdid":-1}\n')
            assert [c.line()["code"] for c in conns] == [0] * 300
            assert server.peers == {"127.0.0.1": 300} and server.stats.connections_rejected == 0
        finally:
            for c in conns:
                c.close()


@pytest.mark.slow
def test_unauthenticated_connection_is_closed_after_auth_timeout() -> None:
    with serve(auth_token=TOKEN, auth_timeout=0.3) as server:
        with RawConn(server.address) as conn:
            started = time.monotonic()
            assert conn.call(Builtin.PING)["code"] == 0  # pings do not extend the auth deadline
            reply = conn.line(timeout=3)
            assert reply == {"code": 401, "cmdid": None, "goaway": "auth_timeout",
                             "msg": "not authenticated within 0.3s"}
            conn.expect_eof()
            assert 0.25 < time.monotonic() - started < 2.0
        with RawConn(server.address) as conn:  # authenticated in time: no deadline any more
            assert conn.call(Builtin.AUTH, {"token": TOKEN})["code"] == 0
            gevent.sleep(0.6)
            assert conn.call(1, {"still": "here"})["data"] == {"still": "here"}
