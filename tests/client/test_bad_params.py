"""One caller's bad data never fails the other callers on its shared client connection (issue 10, item 4).

Params the server would refuse (a lone surrogate, as ``os.fsdecode()`` gives for an undecodable file
name; dict keys that collide once converted to JSON strings) are refused by the client before anything
is written, with the ``ValueError`` NaN already gets; and an id-less 400 (the server's answer to a line
whose id it could not read) answers the oldest waiting call, since replies come in request order,
instead of failing the whole connection.
"""

import json
import os
import threading

import gevent
import pytest

from geventtcp.client import Client
from geventtcp.errors import BadRequest
from tests.support import client_app
from tests.support.faults import FakeServer
from tests.support.servers import ServerProcess, addr, serve

#: Params the server refuses with a 400; the client must refuse them first (nothing sent).
BAD_PARAMS = [
    pytest.param({"path": os.fsdecode(b"caf\xe9.txt")}, id="lone-surrogate-from-fsdecode"),
    pytest.param({"deep": [{"name": "\ud800"}]}, id="lone-surrogate-nested"),
    pytest.param({"\udcff": 1}, id="lone-surrogate-key"),
    pytest.param({1: "a", "1": "b"}, id="int-key-collides"),
    pytest.param({"x": {None: 1, "null": 2}}, id="none-key-collides-nested"),
    pytest.param([{True: 1, "true": 2}], id="bool-key-collides-in-list"),
    pytest.param({1.5: 1, "1.5": 2}, id="float-key-collides"),
    # A backslash written as text ("\\ud800", six characters) right before a lone low surrogate:
    # the escaped backslash must not make the text read as the high half of a pair.
    pytest.param({"k": "\\ud800\udc00"}, id="lone-low-surrogate-after-escaped-backslash"),
]


@pytest.mark.parametrize("codec", ["simplejson", "orjson"])
@pytest.mark.parametrize("bad", BAD_PARAMS)
def test_params_the_server_would_refuse_raise_value_error_before_sending(bad, codec):
    """20 non-idempotent callers share one connection with a caller whose params the server would
    refuse: that caller gets ValueError and nothing of it reaches the server; the 20 all succeed."""
    with serve(client_app.registry) as server, \
            Client(addr(server), timeout=10, pool_size=1, retries=0, codec=codec) as client:
        client_app.executed.clear()
        jobs = [gevent.spawn(client.call, 4, {"tag": f"ok{i}", "seconds": 0.05}) for i in range(20)]
        gevent.sleep(0.01)  # all 20 written and waiting on the one connection
        with pytest.raises(ValueError):
            client.call(4, bad)
        gevent.joinall(jobs, timeout=10)
        assert [job.value for job in jobs] == [{"tag": f"ok{i}", "pid": os.getpid()} for i in range(20)]
        assert sorted(client_app.executed) == sorted(f"ok{i}" for i in range(20))
        assert server.stats.protocol_errors == 0  # the bad line was never written
        (pools,) = client.describe().values()
        assert pools[0]["connections"] == 1
        assert client.call(1, {"after": "bad"}) == {"after": "bad"}


@pytest.mark.parametrize("codec", ["simplejson", "orjson"])
def test_valid_params_near_the_refused_shapes_still_go_out(codec):
    """What the refusal must not catch: surrogate pairs, non-str keys that do not collide,
    numeric-looking str keys, escapes in strings."""
    good = {"emoji": "\U0001f600", "e": "\ud83d\ude00", 1: "one", "2": "two", None: 0, False: 1,
            "true\"": "q", "k": "a\\ud800", "n": {"10": 1, 11: 2}, "0.5": 0.5}
    with serve(client_app.registry) as server, Client(addr(server), timeout=5, codec=codec) as client:
        assert client.call(1, good) == json.loads(json.dumps(good))


def test_threads_sharing_one_connection_with_a_bad_caller():
    """The same with OS threads on one connection (pool_size=1) to a server in another process."""
    server = ServerProcess()
    try:
        with Client(server.address, timeout=10, pool_size=1, retries=0, mode="threads") as client:
            results: dict[int, object] = {}
            start = threading.Barrier(21)

            def good(i):
                start.wait()
                try:
                    results[i] = client.call(2, {"i": i, "seconds": 0.05})
                except Exception as exc:  # reported by the assertion below
                    results[i] = exc

            def bad():
                start.wait()
                try:
                    client.call(2, {"path": os.fsdecode(b"\xff"), 7: 1, "7": 2})
                except ValueError as exc:
                    results[-1] = exc

            threads = [threading.Thread(target=good, args=(i,)) for i in range(20)]
            threads.append(threading.Thread(target=bad))
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=20)
            assert isinstance(results.pop(-1), ValueError)
            assert results == {i: {"i": i, "seconds": 0.05} for i in range(20)}
            assert sum(p["connections"] for p in client.describe()["threads"]) == 1
    finally:
        server.close()


def test_id_less_400_answers_the_oldest_waiting_call_only():
    """Replies come in request order, so a 400 the server could not give an id to is the reply to
    the oldest unanswered request: that call gets BadRequest, the others their own replies, and the
    connection stays open."""

    def behaviour(server, sock, n):
        buf: list[bytes] = []
        lines = [server.read_line(sock, buf) for _ in range(4)]
        first = json.loads(lines[0])
        assert first["params"] == {"i": 0}
        sock.sendall(b'{"code":400,"cmdid":null,"msg":"invalid JSON: lone surrogate"}\n')
        for line in lines[1:]:
            req = json.loads(line)
            sock.sendall(json.dumps({"code": 0, "cmdid": req["cmdid"], "id": req["id"],
                                     "data": req["params"]}).encode() + b"\n")
        while (line := server.read_line(sock, buf)) is not None:
            req = json.loads(line)
            sock.sendall(json.dumps({"code": 0, "cmdid": req["cmdid"], "id": req["id"],
                                     "data": req["params"]}).encode() + b"\n")

    fake = FakeServer(behaviour)
    try:
        with Client(fake.address, timeout=5, retries=0, pool_size=1) as client:
            jobs = []
            for i in range(4):
                jobs.append(gevent.spawn(client.call, 4, {"i": i}))
                gevent.sleep(0.01)  # written in this order
            gevent.joinall(jobs, timeout=10)
            assert isinstance(jobs[0].exception, BadRequest) and "lone surrogate" in jobs[0].exception.msg
            assert [job.value for job in jobs[1:]] == [{"i": i} for i in range(1, 4)]
            assert client.call(1, {"same": "connection"}) == {"same": "connection"}
        assert fake.accepted == 1
    finally:
        fake.close()
