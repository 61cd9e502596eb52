"""The server's reply path under hostile results and peers (issue 10 items 1, 2, 7 and 18e).

Queued reply bytes are bounded while the head of the queue is blocked; a result that cannot be
encoded (any exception, a lone surrogate) is a 500 and never costs the connection or an in-flight
count; requests never see each other's contextvars; a handler that swallows its deadline still
gets the 504 sent at the deadline.
"""

from __future__ import annotations

import contextvars
import json
import socket as stdsocket
import struct
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent.event import Event

from geventtcp import Registry, Server
from geventtcp.server.builtins import Builtin
from tests.support.apps import make_registry
from tests.support.rawconn import RawConn
from tests.support.servers import queued_bytes
from tests.support.system import rss_kib, wait_until

MIB = 1 << 20


@pytest.mark.slow
def test_blocked_head_and_large_replies_keep_queued_bytes_bounded_and_in_order(serve: Callable[..., Server]) -> None:
    """Item 1: a blocked first request, then 32 echo lines whose replies are 1.5 MiB each (4-byte
    UTF-8 characters come back as \\u escapes), and a peer that reads nothing: the server stops
    reading at about 1 MiB queued (it held all 48 MiB, and joined them into one send), then every
    reply arrives in order once the peer reads."""
    server = serve()
    chars = 1 << 17  # 512 KiB line, 1.5 MiB reply
    count = 32
    text = "\U0001f600" * chars
    lines = [json.dumps({"cmdid": 1, "params": {"s": text}, "id": k}, ensure_ascii=False).encode() + b"\n"
             for k in range(1, count + 1)]
    reply_size = len(json.dumps(text)) + 64
    peak = {"queued": 0, "rss": 0}
    before = rss_kib()
    head_done = Event()

    def sample() -> None:
        while True:
            peak["queued"] = max(peak["queued"], queued_bytes(server))
            if not head_done.is_set():
                peak["rss"] = max(peak["rss"], rss_kib() - before)
            gevent.sleep(0.005)

    sampler = gevent.spawn(sample)
    conn = RawConn(server.address, timeout=20)
    conn.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 65536)
    try:
        def send_all() -> None:
            conn.send(b'{"cmdid":2,"params":{"seconds":1.0},"id":0}\n')
            for line in lines:
                conn.send(line)

        sender = gevent.spawn(send_all)
        gevent.sleep(1.0)  # the head sleeps 1 s, reads nothing meanwhile
        wait_until(lambda: not server.inflight, timeout=10)  # the head is answered (sent or being sent)
        gevent.sleep(0.3)  # the flush after the head
        head_done.set()
        assert conn.line()["id"] == 0
        for k in range(1, count + 1):
            reply = conn.line(timeout=20)
            assert (reply["code"], reply["id"]) == (0, k)
            assert reply["data"]["s"] == text
        sender.get(timeout=10)
    finally:
        sampler.kill()
        conn.close()
    assert peak["queued"] <= MIB + 2 * reply_size, f"{peak['queued'] / MIB:.1f} MiB queued"
    assert peak["rss"] < 24 * 1024, f"server RSS grew by {peak['rss'] / 1024:.1f} MiB"


@pytest.mark.parametrize("kind", ["unknown cmdid", "invalid params"])
def test_error_replies_echoing_a_large_id_keep_queued_bytes_bounded(serve: Callable[..., Server], kind: str) -> None:
    """Item 1 through error replies: every reply echoes the line's id, errors included; an id of 250
    4-byte characters (ids are at most 256 characters since protocol 1.1) comes back escaped as a
    1.5 KiB 404 (or 400). Behind a blocked first request, with a peer that reads nothing, 1,000 such
    error lines (1.5 MiB) must count against MAX_QUEUED_BYTES as replies do (they were appended
    uncounted: only the 1024-reply count bounded them), then all arrive in order."""
    server = serve()
    chars = 250  # with "k:" an id of at most 255 characters; 1.5 KiB once escaped
    count = 1000
    text = "\U0001f600" * chars
    body: dict[str, Any] = {"cmdid": 99999} if kind == "unknown cmdid" else {"cmdid": 1, "params": [1]}
    lines = [json.dumps({**body, "id": f"{k}:{text}"}, ensure_ascii=False).encode() + b"\n"
             for k in range(1, count + 1)]
    reply_size = len(json.dumps(text)) + 128
    peak = {"queued": 0}

    def sample() -> None:
        while True:
            peak["queued"] = max(peak["queued"], queued_bytes(server))
            gevent.sleep(0.005)

    sampler = gevent.spawn(sample)
    conn = RawConn(server.address, timeout=20)
    conn.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 65536)
    try:
        def send_all() -> None:
            conn.send(b'{"cmdid":2,"params":{"seconds":1.0},"id":0}\n')
            for line in lines:
                conn.send(line)

        sender = gevent.spawn(send_all)
        gevent.sleep(1.0)  # the head sleeps 1 s, the peer reads nothing meanwhile
        wait_until(lambda: not server.inflight, timeout=10)
        gevent.sleep(0.3)
        assert conn.line()["id"] == 0
        expected = 404 if kind == "unknown cmdid" else 400
        for k in range(1, count + 1):
            reply = conn.line(timeout=20)
            assert (reply["code"], reply["id"]) == (expected, f"{k}:{text}")
        sender.get(timeout=10)
    finally:
        sampler.kill()
        conn.close()
    assert peak["queued"] <= MIB + 2 * reply_size, f"{peak['queued'] / MIB:.1f} MiB queued"


class _Poison:
    """A result whose attribute lookups raise, as a werkzeug LocalProxy outside its context does."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("working outside of request context")


class _Row:
    """Encoded through its ``_asdict`` (as a namedtuple-like record): strings a value walk cannot see."""

    def __init__(self, s: str) -> None:
        self.s = s

    def _asdict(self) -> dict[str, Any]:
        return {"s": self.s}


def _poison_registry() -> Registry:
    reg = make_registry()
    reg.add(30, lambda req: _Poison(), name="poison")

    def poison_later(req: Any) -> Any:
        gevent.sleep(0.01)  # handed off first
        return _Poison()

    reg.add(31, poison_later, name="poison_later")
    reg.add(32, lambda req: {"s": "\ud800"} if req.params.get("lone") else {"s": "\ud83d\ude00"}, name="surrogate")
    reg.add(33, lambda req: [("\udc00",)], name="surrogate_in_tuple")
    reg.add(34, lambda req: _Row("\ud800" if req.params.get("lone") else "\ud83d\ude00"), name="surrogate_in_asdict")
    return reg


def test_result_whose_encoding_raises_is_a_500_and_earlier_replies_go_out(serve: Callable[..., Server]) -> None:
    """Item 2, inline: the poisoned result costs its own request a 500, not the connection (and not
    the reply computed before it in the same batch)."""
    server = serve(_poison_registry())
    with RawConn(server.address) as conn:
        conn.send(b'{"cmdid":1,"params":{"n":1},"id":1}\n{"cmdid":30,"id":2}\n{"cmdid":1,"params":{"n":3},"id":3}\n')
        assert conn.line() == {"code": 0, "cmdid": 1, "id": 1, "data": {"n": 1}}
        assert conn.line() == {"code": 500, "cmdid": 30, "id": 2, "msg": "result not serializable"}
        assert conn.line() == {"code": 0, "cmdid": 1, "id": 3, "data": {"n": 3}}


def test_handed_off_result_whose_encoding_raises_releases_its_inflight_count(serve: Callable[..., Server]) -> None:
    """Item 2, handed off: each poisoned result is a 500 and its count is released, so after more
    such calls than max_inflight the worker still serves PING and echo."""
    server = serve(_poison_registry(), max_inflight=2)
    for k in range(4):
        with RawConn(server.address) as conn:
            assert conn.call(31, id=k) == {"code": 500, "cmdid": 31, "id": k, "msg": "result not serializable"}
            assert conn.call(1, {"n": k}, id=10 + k)["code"] == 0
    assert server.inflight == 0
    with RawConn(server.address) as conn:
        assert conn.call(int(Builtin.PING), id=99)["code"] == 0


def test_lone_surrogate_in_a_result_is_a_500_and_a_pair_goes_through(serve: Callable[..., Server]) -> None:
    """Item 2 (issue item 4, server side): a result holding a lone surrogate would be sent as an
    escape the client's strict codec refuses (dropping the connection): it is a 500 with id and cmdid."""
    server = serve(_poison_registry())
    with RawConn(server.address) as conn:
        assert conn.call(32, {"lone": True}, id="a") == {
            "code": 500, "cmdid": 32, "id": "a", "msg": "result not serializable"}
        assert conn.call(33, id=2) == {"code": 500, "cmdid": 33, "id": 2, "msg": "result not serializable"}
        assert conn.call(32, id=3) == {"code": 0, "cmdid": 32, "id": 3, "data": {"s": "\U0001f600"}}
        assert conn.call(34, {"lone": True}, id=4) == {
            "code": 500, "cmdid": 34, "id": 4, "msg": "result not serializable"}
        assert conn.call(34, id=5) == {"code": 0, "cmdid": 34, "id": 5, "data": {"s": "\U0001f600"}}


def test_aborted_connection_releases_the_counts_of_its_running_handlers(serve: Callable[..., Server]) -> None:
    """Item 2: a connection reset while a handler blocks releases that handler's in-flight count at
    once (not when, if ever, the handler ends), and the handler's end does not release it twice."""
    release = Event()
    ended = Event()

    def stuck(req: Any) -> Any:
        try:
            release.wait()
            return "done"
        finally:
            ended.set()

    reg = make_registry()
    reg.add(40, stuck, name="stuck")
    server = serve(reg)
    conn = RawConn(server.address)
    conn.request(40, id=1)
    wait_until(lambda: server.inflight == 1)
    conn.sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST: the server's read fails and aborts the connection
    wait_until(lambda: server.inflight == 0, timeout=3)
    release.set()
    ended.wait(timeout=5)
    gevent.sleep(0.05)
    assert server.inflight == 0


_user: contextvars.ContextVar[str | None] = contextvars.ContextVar("user", default=None)
_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)


def test_requests_do_not_share_contextvars(serve: Callable[..., Server]) -> None:
    """Item 7: pipelined requests (run inline in one reader greenlet) and handed-off ones each start
    from the worker's base context; a value one request sets is never seen by the next."""

    def whoami(req: Any) -> Any:
        seen = _user.get()
        _user.set(req.params["name"])
        if req.params.get("yield"):
            gevent.sleep(0.01)
        return [seen, _user.get(), _tenant.get()]

    reg = make_registry()
    reg.add(50, whoami, name="whoami")
    token = _tenant.set("acme")  # the base context: what the worker set before serving
    try:
        server = serve(reg)
    finally:
        _tenant.reset(token)
    with RawConn(server.address) as conn:
        conn.send(b"".join(b'{"cmdid":50,"params":{"name":"user%d"},"id":%d}\n' % (k, k) for k in range(4)))
        assert [conn.line()["data"] for _ in range(4)] == [[None, f"user{k}", "acme"] for k in range(4)]
        conn.send(b'{"cmdid":50,"params":{"name":"a","yield":true},"id":5}\n'
                  b'{"cmdid":50,"params":{"name":"b"},"id":6}\n'
                  b'{"cmdid":50,"params":{"name":"c","yield":true},"id":7}\n')
        assert [conn.line()["data"] for _ in range(3)] == [[None, name, "acme"] for name in "abc"]


@pytest.mark.slow
def test_handler_that_swallows_its_deadline_still_gets_the_504_at_the_deadline(serve: Callable[..., Server]) -> None:
    """Item 18e: ``except BaseException`` around a blocking call eats DeadlineReached; the 504 goes
    out at the deadline anyway, the request's counts are released then, and the handler's eventual
    result (late, or at once) is discarded: the next reply on the connection is the next request's."""
    finished: list[str] = []

    def stubborn(req: Any) -> Any:
        try:
            gevent.sleep(10)
        except BaseException:  # noqa: BLE001 - the defect under test
            pass
        if req.params.get("linger"):
            gevent.sleep(req.params["linger"])
        finished.append(req.params.get("tag", ""))
        return "too late"

    reg = make_registry()
    reg.add(60, stubborn, name="stubborn")
    server = serve(reg)
    with RawConn(server.address) as conn:
        started = time.monotonic()
        conn.send(b'{"cmdid":60,"params":{"linger":1.0,"tag":"late"},"id":1,"timeout_ms":200}\n'
                  b'{"cmdid":1,"params":{"n":2},"id":2}\n')
        assert conn.line() == {"code": 504, "cmdid": 60, "id": 1, "msg": "deadline exceeded"}
        assert time.monotonic() - started < 0.8
        assert conn.line() == {"code": 0, "cmdid": 1, "id": 2, "data": {"n": 2}}
        assert server.inflight == 0 and not finished  # released at the deadline, the handler still runs
        assert conn.call(60, {"tag": "at once"}, id=3, timeout_ms=100) == {
            "code": 504, "cmdid": 60, "id": 3, "msg": "deadline exceeded"}
        wait_until(lambda: finished == ["at once", "late"] or finished == ["late", "at once"], timeout=5)
        assert conn.call(1, {"n": 4}, id=4) == {"code": 0, "cmdid": 1, "id": 4, "data": {"n": 4}}
        assert server.inflight == 0
    assert server.stats.commands[60].count == 2 and server.stats.commands[60].errors == 2
