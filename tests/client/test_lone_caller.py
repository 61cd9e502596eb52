"""The lone caller's shortcut (issue 14) equals the reference path, and callers arriving mid-call share.

``ClientConnection._lead`` lets the reader complete its own call straight from a read holding
exactly that call's success reply, past the line buffer, ``_on_line`` and the envelope's parse.
Every scenario here runs twice: with the shortcut (``fast``, which must then have been taken) and
with it disabled (``reference``: every line through the line buffer and ``_on_line``); the outcomes
(replies, exception classes and codes) must be the same explicit list on both, in the threads
world and the gevent world. Then callers (threads, greenlets) arrive while a lone call is in flight
and its caller reads on the fast path: every caller gets its own reply on the one connection.
"""

import json
import threading
import time
from typing import Any

import gevent
import pytest

from geventtcp.client.client import Client
from geventtcp.client.connection import ClientConnection
from geventtcp.client.replycodec import ReplyCodec
from geventtcp.errors import GeventTCPError, RemoteError
from tests.support import client_app
from tests.support.faults import FakeServer
from tests.support.system import in_thread, wait_until


@pytest.fixture(params=["fast", "reference"])
def path(request: Any, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Which path replies take; the list records each shortcut decision (``fast`` only)."""
    taken: list[bool] = []
    if request.param == "reference":  # no read is ever its caller's own reply: all take the reference path
        monkeypatch.setattr(ReplyCodec, "own_reply", lambda self, data, cmdid, rid: None)
    else:
        original = ReplyCodec.own_reply

        def spy(self: ReplyCodec, data: bytes, cmdid: int, rid: int) -> Any:
            reply = original(self, data, cmdid, rid)
            taken.append(reply is not None)
            return reply

        monkeypatch.setattr(ReplyCodec, "own_reply", spy)
    return taken


def outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(*args, **kwargs))
    except RemoteError as exc:
        return ("remote", type(exc).__name__, exc.code)
    except GeventTCPError as exc:
        return ("transport", type(exc).__name__)


def run_in(mode: str, fn: Any) -> Any:
    """``fn()`` in a new thread (its own world: no hub there unless ``mode`` is gevent), while this
    thread's hub keeps running (the in-process fake server lives there)."""
    thread, out = in_thread(fn)
    wait_until(lambda: not thread.is_alive(), timeout=60)
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- against the real server ------------------------------------------------------------------

UNICODE = "caf\u00e9 \U0001f600 \\ \""  # escapes in the reply: the surrogate post-check runs
REAL_CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], tuple[Any, ...]]] = [
    ("echo", (client_app.ECHO, {"a": 1, "b": [1.5, None, True]}), {}, ("ok", {"a": 1, "b": [1.5, None, True]})),
    ("unicode", (client_app.ECHO, {"s": UNICODE}), {}, ("ok", {"s": UNICODE})),
    ("none", (client_app.ECHO, None), {}, ("ok", {})),
    ("envelope in data", (client_app.ECHO, {"s": '},"id":9,"data":1}'}), {}, ("ok", {"s": '},"id":9,"data":1}'})),
    ("big", (client_app.ECHO, {"x": "y" * 200000}), {}, ("ok", {"x": "y" * 200000})),
    ("500", (client_app.FAIL, None), {}, ("remote", "InternalServerError", 500)),
    ("ping", (-1, None), {}, ("ok", "pong")),
    ("server deadline", (client_app.SLEEP, {"seconds": 0.6}), {"timeout": 0.2}, ("remote", "DeadlineExceeded", 504)),
    ("after it", (client_app.ECHO, {"n": 2}), {}, ("ok", {"n": 2})),
]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["threads", "gevent"])
def test_replies_and_errors_equal_on_both_paths(app_process: Any, path: list[bool], mode: str) -> None:
    def scenario() -> list[tuple[Any, ...]]:
        results = []
        with Client(app_process.address, timeout=5, retries=0, mode=mode, pool_size=1) as client:
            for _name, args, kwargs, _expected in REAL_CASES:
                got = outcome(client.call, *args, **kwargs)
                if args[0] == -1 and got[0] == "ok":
                    got = ("ok", "pong" if got[1]["pong"] is True else got[1])
                results.append(got)
            conns = [len(p.conns) for b in client._balancers.values() for p in b.pools]
        assert conns == [1]  # one connection throughout
        return results

    assert run_in(mode, scenario) == [expected for *_, expected in REAL_CASES]
    # Fast: the shortcut completed the plain successes (echo, unicode, none, envelope, ping, after;
    # the 200 KB reply may come in more than one read); reference: it never ran. The first call's read
    # may also hold the reply to the HELLO sent with it: then the reference path reads it.
    assert path == [] or path.count(True) >= 5


# -- against a server sending what ours would not (or not in one piece) --------------------------

def scripted(fake: FakeServer, sock: Any, n: int) -> None:
    """Answers each request as its ``params.case`` says."""
    buf: list[bytes] = []
    while True:
        line = fake.read_line(sock, buf)
        if line is None:
            return
        request = json.loads(line)
        rid, case = request["id"], request["params"].get("case")
        prefix = b'{"code":0,"cmdid":1,"id":%d,"data":' % rid
        if case == "split":  # the reply in two reads
            sock.sendall(prefix)
            gevent.sleep(0.05)
            sock.sendall(b'"split"}\n')
        elif case == "blank first":  # two lines in one read
            sock.sendall(b"\n" + prefix + b'"b"}\n')
        elif case == "key order":  # valid, not our server's layout
            sock.sendall(b'{"code":0,"cmdid":1,"data":"k","id":%d}\n' % rid)
        elif case == "error":
            sock.sendall(b'{"code":1005,"cmdid":1,"id":%d,"msg":"nope"}\n' % rid)
        elif case == "surrogate":  # a lone surrogate: the line is refused, the connection closes
            sock.sendall(prefix + b'"\\ud800"}\n')
        elif case == "wrong id":
            sock.sendall(b'{"code":0,"cmdid":1,"id":%d,"data":1}\n' % (rid + 1000))
        elif case == "late":  # after the caller gave up: the reply is read later and dropped
            gevent.sleep(0.4)
            sock.sendall(prefix + b'"late"}\n')
        elif case == "goaway":
            sock.sendall(b'{"code":503,"msg":"going away","goaway":"draining"}\n')
            return
        elif case == "close":
            return
        else:
            sock.sendall(prefix + b'"ok"}\n')


FAKE_CASES = [
    ("plain", ("ok", "ok")), ("split", ("ok", "split")), ("blank first", ("ok", "b")), ("key order", ("ok", "k")),
    ("error", ("remote", "NotFound", 1005)), ("late", ("transport", "CallTimeout")), ("plain", ("ok", "ok")),
    ("surrogate", ("transport", "MaybeExecuted")), ("wrong id", ("transport", "MaybeExecuted")),
    ("goaway", ("transport", "Unprocessed")), ("close", ("transport", "MaybeExecuted")), ("plain", ("ok", "ok")),
]


@pytest.mark.parametrize("mode", ["threads", "gevent"])
@pytest.mark.parametrize(("codec", "taken"), [("simplejson", 3), ("orjson", 5)])
def test_odd_replies_and_connection_loss_equal_on_both_paths(path: list[bool], mode: str, codec: str,
                                                             taken: int) -> None:
    fake = FakeServer(scripted)
    try:
        def scenario() -> list[tuple[Any, ...]]:
            with Client(fake.address, timeout=5, retries=0, mode=mode, pool_size=1, codec=codec) as client:
                return [outcome(client.call, 1, {"case": case}, timeout=0.1 if case == "late" else None)
                        for case, _ in FAKE_CASES]

        assert run_in(mode, scenario) == [expected for _, expected in FAKE_CASES]
    finally:
        fake.close()
    if path:  # fast: taken for the plain replies (orjson: also the other layout and the error reply)
        # The client's HELLO leaves with the first call on each new connection; when its reply comes in
        # the same read as that call's (usual in the gevent world, a matter of timing with threads), the
        # reference path reads them. Here that can cost the first "plain" (first connection) and the last
        # (a new connection after "close"), never another.
        assert taken - 2 <= path.count(True) <= taken


# -- callers arriving while a lone call is in flight ---------------------------------------------

def _lone_conn(client: Client) -> ClientConnection:
    conns = [c for b in client._balancers.values() for p in b.pools for c in p.conns]
    assert len(conns) == 1
    return conns[0]


@pytest.mark.slow
@pytest.mark.subprocess
def test_threads_arriving_while_a_lone_call_reads_share_its_connection(app_process: Any, path: list[bool]) -> None:
    with Client(app_process.address, timeout=10, pool_size=1, mode="threads") as client:
        assert run_in("threads", lambda: client.call(client_app.ECHO, {"warm": 1})) == {"warm": 1}
        conn = _lone_conn(client)
        lone, lone_out = in_thread(client.call, client_app.SLEEP, {"seconds": 0.5})
        wait_until(lambda: conn.reading and len(conn.calls) == 1)  # the lone caller reads its socket
        results: dict[int, Any] = {}

        def caller(i: int) -> None:
            results[i] = client.call(client_app.ECHO, {"i": i})

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        wait_until(lambda: not lone.is_alive() and not any(t.is_alive() for t in threads), timeout=30)
        assert lone_out.get("value") == {"seconds": 0.5}
        assert results == {i: {"i": i} for i in range(10)}
        assert _lone_conn(client) is conn and not conn.calls and not conn.closed


@pytest.mark.slow
@pytest.mark.subprocess
def test_greenlets_arriving_while_a_lone_call_reads_share_its_connection(app_process: Any, path: list[bool]) -> None:
    def scenario() -> tuple[Any, list[Any], bool]:
        with Client(app_process.address, timeout=10, mode="gevent") as client:
            client.call(client_app.ECHO, {"warm": 1})
            conn = _lone_conn(client)
            lone = gevent.spawn(client.call, client_app.SLEEP, {"seconds": 0.3})
            while not (conn.reading and len(conn.calls) == 1):
                gevent.sleep(0.001)
            started = time.monotonic()
            others = [gevent.spawn(client.call, client_app.ECHO, {"i": i}) for i in range(20)]
            gevent.joinall([lone, *others], raise_error=True, timeout=20)
            # Replies come in request order: the others waited behind the sleep on the one connection.
            assert time.monotonic() - started < 10
            return lone.value, [g.value for g in others], _lone_conn(client) is conn and not conn.calls

    lone, others, same = run_in("gevent", scenario)
    assert lone == {"seconds": 0.3}
    assert others == [{"i": i} for i in range(20)]
    assert same


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["threads", "gevent"])
def test_several_callers_in_completion_order_get_their_own_replies_on_both_paths(
        app_process: Any, path: list[bool], mode: str) -> None:
    # Protocol 1.1 (granted by the real server): replies come as they are ready, so a reader's read holds
    # other callers' replies before its own, and a lone reader's own reply may come alone right after.
    # On one connection, slow and fast callers, each round started together: everyone gets exactly its
    # own reply, fast ones before the slow ones end, on the shortcut and on the reference path alike.
    def scenario() -> tuple[list[Any], bool, int]:
        with Client(app_process.address, timeout=10, pool_size=1, mode=mode) as client:
            client.call(client_app.ECHO, {"warm": 1})
            conn = _lone_conn(client)
            got: list[Any] = []
            for round_ in range(3):
                jobs = [(client_app.SLEEP, {"seconds": 0.3, "r": round_, "i": i}) for i in range(2)]
                jobs += [(client_app.ECHO, {"r": round_, "i": i}) for i in range(12)]
                fast_done: list[float] = []
                started = time.monotonic()

                def one(cmdid: int, params: Any, fast_done: list[float] = fast_done, started: float = started) -> Any:
                    reply = client.call(cmdid, params)
                    if cmdid == client_app.ECHO:
                        fast_done.append(time.monotonic() - started)
                    return reply

                if mode == "gevent":
                    greenlets = [gevent.spawn(one, *job) for job in jobs]
                    gevent.joinall(greenlets, raise_error=True, timeout=20)
                    got.extend(g.value for g in greenlets)
                else:
                    outs = [in_thread(one, *job) for job in jobs]
                    for thread, _ in outs:
                        thread.join(20)
                    got.extend(out.get("value", out.get("error")) for _, out in outs)
                assert max(fast_done) < 0.3  # none waited behind a slow one
                got.append(client.call(client_app.ECHO, {"after": round_}))  # alone again: its own read
            return got, conn.unordered, _lone_conn(client) is conn

    got, unordered, same = run_in(mode, scenario)
    assert unordered and same
    # Fast: at least the lone calls between rounds took their own reply straight from a read (whether
    # a reader in a round does depends on timing: a caller that once waited for the role never does).
    assert path == [] or path.count(True) >= 3
    assert got == [params for r in range(3) for params in
                   [{"seconds": 0.3, "r": r, "i": i} for i in range(2)] + [{"r": r, "i": i} for i in range(12)]
                   + [{"after": r}]]
