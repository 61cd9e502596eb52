"""Completion order against a model of what the spec allows (docs/protocol.md, protocol 1.1).

Random pipelined mixes around a HELLO granting ``unordered`` (a few requests before it, in request
order, the rest in one to three writes some time apart): requests with and without ids, inline
(echo, handler errors, unknown cmdids, bad lines, lines over the limit) and handed off (sleeps, a
``504`` at a deadline, also for a handler that swallows it, a handler error after blocking, a reply
over ``max_reply_bytes``, a handler that yields once: inline or handed off), and reuses
of an id in flight. Each case is checked for: one reply per request line, each the expected one; an
id-less reply after the replies of every request read before it and before those read after it (the
client matches id-less replies by order); a refusal for a reused id after that id's first reply; and
each reply no later than the model allows (a reply with an id leaves when ready unless an id-less
request read before it is unanswered), checked as an order between replies whose model times differ
by more than ``MARGIN`` and as an arrival bound.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import pytest

from geventtcp import Server
from geventtcp.errors import Code, HandlerError
from tests.support.apps import make_registry
from tests.support.rawconn import RawConn
from tests.support.system import wait_until

Serve = Callable[..., Server]
HELLO = b'{"cmdid":-5,"id":"h","params":{"protocol":"1.1","features":["unordered"]}}\n'
#: Model times closer than this are not ordered by the check (scheduling noise on a loaded machine).
MARGIN = 0.12
#: How late a reply may arrive after its model time.
SLACK = 0.6
MAX_LINE = 2048
MAX_REPLY = 4096
SLEEPS = (0.1, 0.3, 0.5)


def _sleep_then_fail(req: Any) -> Any:
    gevent.sleep(req.params["seconds"])
    raise RuntimeError("failed after blocking")


def _sleep_then_refuse(req: Any) -> Any:
    gevent.sleep(req.params["seconds"])
    raise HandlerError("gone", Code.NOT_FOUND)


def _swallow_deadline(req: Any) -> Any:
    """Catches the DeadlineReached thrown at its deadline and runs on: the 504 still leaves at the deadline."""
    try:
        gevent.sleep(2.0)
    except BaseException:  # noqa: BLE001 - on purpose: the server must not wait for it
        gevent.sleep(0.3)
    return "late"


def _yield_once(req: Any) -> Any:
    """Yields to the hub once: answered inline or handed off, whichever the watch pass decides."""
    gevent.sleep(0)
    return req.params


@dataclass
class Req:
    line: bytes
    rid: Any  # None: id-less
    code: int
    ready: float  # seconds after the write when its reply is ready (0: inline)
    data: Any = None
    dup_of: int | None = None  # index of the request whose id it reuses
    send: float = 0.0  # model: earliest time the spec lets its reply leave
    handed_off: bool = False
    at: float = 0.0  # when its line is written (seconds after the first write)
    barrier: bool = False  # its reply keeps request order: id-less, or read before the HELLO (or the HELLO)


def _line(cmdid: int, params: dict[str, Any], rid: Any, **fields: Any) -> bytes:
    body: dict[str, Any] = {"cmdid": cmdid, "timestamp": 0, "params": params, **fields}
    if rid is not None:
        body["id"] = rid
    return json.dumps(body).encode() + b"\n"


def _make_case(rng: random.Random, n: int) -> list[Req]:
    """``n`` random requests after the HELLO (and up to 3 before it, in request order), written in
    one to three writes some time apart."""
    reqs: list[Req] = []
    next_id = 0
    idless = rng.choice((0.0, 0.1, 0.3))  # the share of id-less requests (barriers) in this case
    for _ in range(rng.choice((0, 0, 1, 3))):  # read before the HELLO: in request order
        next_id += 1
        s = rng.choice(SLEEPS)
        reqs.append(Req(_line(2, {"seconds": s}, next_id), next_id, 0, s, data={"slept": s}, barrier=True))
    reqs.append(Req(HELLO, "h", 0, 0.0, barrier=True))
    now = 0.0
    for _ in range(n):
        if rng.random() < 0.1:  # the lines from here on go in a later write
            now += rng.choice((0.05, 0.2, 0.35))
        rid: Any = None
        if rng.random() >= idless:
            next_id += 1
            rid = next_id if rng.random() < 0.5 else f"r{next_id}"
        kind = rng.choice(["echo", "echo", "sleep", "sleep", "sleep", "timeout", "fail", "refuse", "unknown",
                           "badjson", "badparams", "toolong", "big", "slowfail", "slowrefuse", "dup", "dup",
                           "swallow", "yield"])
        s = rng.choice(SLEEPS)
        if kind == "echo":
            params = {"k": len(reqs)}
            reqs.append(Req(_line(1, params, rid), rid, 0, 0.0, data=params))
        elif kind == "sleep":
            reqs.append(Req(_line(2, {"seconds": s}, rid), rid, 0, s, data={"slept": s}, handed_off=True))
        elif kind == "timeout":
            ms = rng.choice((200, 400))
            reqs.append(Req(_line(21, {}, rid, timeout_ms=ms), rid, 504, ms / 1000, handed_off=True))
        elif kind == "swallow":
            ms = rng.choice((200, 400))
            reqs.append(Req(_line(42, {}, rid, timeout_ms=ms), rid, 504, ms / 1000, handed_off=True))
        elif kind == "yield":
            params = {"y": len(reqs)}
            reqs.append(Req(_line(43, params, rid), rid, 0, 0.0, data=params))
        elif kind == "fail":
            reqs.append(Req(_line(3, {}, rid), rid, 500, 0.0))
        elif kind == "refuse":
            reqs.append(Req(_line(5, {}, rid), rid, 1005, 0.0))
        elif kind == "unknown":
            reqs.append(Req(_line(99, {}, rid), rid, 404, 0.0))
        elif kind == "badjson":
            reqs.append(Req(b'{"cmdid":1, oops}\n', None, 400, 0.0))
        elif kind == "badparams":  # 400, its id recovered
            reqs.append(Req(_line(1, [], rid), rid, 400, 0.0))  # type: ignore[arg-type]
        elif kind == "toolong":  # 413 without an id, whatever the line carried
            reqs.append(Req(_line(1, {"s": "x" * MAX_LINE}, rid), None, 413, 0.0))
        elif kind == "big":  # handed off, then its reply is over max_reply_bytes: 413
            reqs.append(Req(_line(9, {"seconds": s, "size": 2 * MAX_REPLY}, rid), rid, 413, s, handed_off=True))
        elif kind == "slowfail":
            reqs.append(Req(_line(40, {"seconds": s}, rid), rid, 500, s, handed_off=True))
        elif kind == "slowrefuse":
            reqs.append(Req(_line(41, {"seconds": s}, rid), rid, 1005, s, handed_off=True))
        else:  # reuse the id of a handed-off request still running (all are, when the batch is read)
            running = [i for i, r in enumerate(reqs)  # still running when this line is read (with a margin)
                       if r.handed_off and not r.barrier and r.rid is not None and r.at + r.ready > now + MARGIN]
            if not running:
                continue
            first = rng.choice(running)
            frid = reqs[first].rid
            line = _line(1, {"k": "dup"}, frid) if rng.random() < 0.6 else _line(1, [], frid)  # type: ignore[arg-type]
            reqs.append(Req(line, frid, 400, 0.0, dup_of=first))
        last = reqs[-1]
        last.at = now
        last.barrier = last.barrier or last.rid is None
    _model(reqs)
    return reqs


def _model(reqs: list[Req]) -> None:
    """The earliest time the spec lets each reply leave: when ready, but an id-less reply after every
    earlier one, any reply after every earlier id-less one, a reused id's refusal after that id's reply."""
    barrier = 0.0  # the latest model time of an id-less reply read so far
    latest = 0.0  # the latest model time of any reply read so far
    for r in reqs:
        t = max(r.at + r.ready, barrier)
        if r.dup_of is not None:
            t = max(t, reqs[r.dup_of].send)
        if r.barrier:
            t = max(t, latest)
            barrier = t
        r.send = t
        latest = max(latest, t)


def _run_case(server: Server, seed: int) -> None:
    rng = random.Random(seed)
    reqs = _make_case(rng, rng.randint(4, 16))
    with RawConn(server.address, timeout=10) as conn:
        started = time.monotonic()

        def write() -> None:
            for at in sorted({r.at for r in reqs}):
                gevent.sleep(max(0.0, started + at - time.monotonic()))
                conn.send(b"".join(r.line for r in reqs if r.at == at))

        writer = gevent.spawn(write)
        got: list[tuple[dict[str, Any], float]] = []
        for _ in reqs:
            reply = conn.line(timeout=10)
            got.append((reply, time.monotonic() - started))
        writer.get(timeout=1)
    # Match: ids by id (a reused id: the first reply is the first request's), id-less by order.
    where: dict[int, int] = {}
    by_id: dict[Any, list[int]] = {}
    idless: list[int] = []
    for pos, (reply, _) in enumerate(got):
        if "id" in reply:
            by_id.setdefault(reply["id"], []).append(pos)
        else:
            idless.append(pos)
    want_idless = [i for i, r in enumerate(reqs) if r.rid is None]
    ctx = f"seed {seed}: sent {[r.line[:60] for r in reqs]}\ngot {[(g[0], round(g[1], 3)) for g in got]}"
    assert len(idless) == len(want_idless), ctx
    for i, pos in zip(want_idless, idless, strict=True):
        where[i] = pos
    for i, r in enumerate(reqs):
        if r.rid is not None:
            positions = by_id.get(r.rid)
            assert positions, f"no reply for id {r.rid!r}; {ctx}"
            where[i] = positions.pop(0)
    assert all(not p for p in by_id.values()), f"extra replies: {by_id}; {ctx}"
    for i, r in enumerate(reqs):
        reply, at = got[where[i]]
        assert reply["code"] == r.code, f"request {i}: {reply}; {ctx}"
        if r.data is not None:
            assert reply["data"] == r.data, ctx
        elif r.rid == "h":
            assert reply["data"]["features"] == ["unordered"], ctx
        if r.dup_of is not None:
            assert where[r.dup_of] < where[i], f"refusal {i} before the reply of {r.dup_of}; {ctx}"
        if r.barrier:  # the barrier rule (request order before the HELLO)
            assert all(where[j] < where[i] for j in range(i)), f"id-less {i} overtook an earlier one; {ctx}"
            assert all(where[j] > where[i] for j in range(i + 1, len(reqs))), f"overtook id-less {i}; {ctx}"
        assert at <= r.send + SLACK, f"request {i} at {at:.3f}, model {r.send:.3f}; {ctx}"
        for j, other in enumerate(reqs):
            if r.send + MARGIN < other.send:
                assert where[i] < where[j], f"request {i} (model {r.send}) after {j} (model {other.send}); {ctx}"


@pytest.mark.slow
def test_random_mixes_follow_the_completion_order_model(serve: Serve, hub_errors: list[Any]) -> None:
    """60 random cases, 6 at a time, each on its own connection."""
    registry = make_registry()
    registry.add(40, _sleep_then_fail, name="sleep_then_fail")
    registry.add(41, _sleep_then_refuse, name="sleep_then_refuse")
    registry.add(42, _swallow_deadline, name="swallow_deadline")
    registry.add(43, _yield_once, name="yield_once")
    server = serve(registry, max_line_bytes=MAX_LINE, max_reply_bytes=MAX_REPLY)
    for first in range(0, 60, 6):
        jobs = [gevent.spawn(_run_case, server, seed) for seed in range(first, first + 6)]
        gevent.joinall(jobs, raise_error=True)
    wait_until(lambda: server.inflight == 0)
    assert [e for e in hub_errors if "failed after blocking" not in str(e) and "raised" not in str(e)] == []
