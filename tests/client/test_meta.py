"""Request metadata end to end over real sockets: ``request.meta`` on the server, ``Client(meta=...)`` and
``call(..., meta=...)`` on the client, in both worlds, for call, call_async and send; a bad meta."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from geventtcp import Registry
from geventtcp.client.batch import BatchingConnection
from geventtcp.client.client import Client
from geventtcp.protocol import EMPTY_META
from tests.support.rawconn import RawConn
from tests.support.servers import addr, serve
from tests.support.system import wait_until

SEEN: list[Any] = []


def show_meta(request: Any) -> Any:
    """Answers the request's meta, and whether it is the shared empty one."""
    return {"meta": dict(request.meta), "empty": request.meta is EMPTY_META}


def record_meta(request: Any) -> Any:
    SEEN.append(dict(request.meta))


@pytest.fixture
def server_addr() -> Iterator[str]:
    registry = Registry()
    registry.add(1, show_meta, name="show_meta")
    registry.add(2, record_meta, name="record_meta")
    SEEN.clear()
    with serve(registry, tracing="off") as server:
        yield addr(server)


def test_the_handler_sees_the_lines_meta_and_an_empty_one_without(server_addr: str) -> None:
    host, port = server_addr.rsplit(":", 1)
    with RawConn((host, int(port))) as conn:
        reply = conn.call(1, id=1, meta={"request_id": "r-1", "tenant": "acme"})
        assert reply == {"code": 0, "cmdid": 1, "id": 1, "data": {"meta": {"request_id": "r-1", "tenant": "acme"},
                                                                   "empty": False}}
        assert conn.call(1, id=2)["data"] == {"meta": {}, "empty": True}
        # A seed client's line (no id, no meta) is unaffected.
        assert conn.call(1)["data"] == {"meta": {}, "empty": True}


def test_a_bad_meta_gets_a_400_with_the_id_and_the_connection_goes_on(server_addr: str) -> None:
    host, port = server_addr.rsplit(":", 1)
    with RawConn((host, int(port))) as conn:
        conn.send(b'{"cmdid":1,"id":"a","meta":{"tenant":"x\\n"}}\n{"cmdid":1,"id":"b","meta":[1]}\n'
                  b'{"cmdid":1,"id":"c","meta":{"ok":"1"}}\n')
        first, second, third = conn.line(), conn.line(), conn.line()
    assert first == {"code": 400, "cmdid": 1, "id": "a", "msg": "meta value of tenant must be printable ASCII"}
    assert (second["code"], second["id"], second["msg"]) == (400, "b", "meta must be a JSON object")
    assert third["data"]["meta"] == {"ok": "1"}


def test_client_meta_is_sent_with_every_call_and_a_calls_meta_merged_over_it(server_addr: str) -> None:
    with Client(server_addr, timeout=5, meta={"tenant": "acme", "request_id": "default"}) as client:
        assert client.call(1)["meta"] == {"tenant": "acme", "request_id": "default"}
        assert client.call(1, meta={"request_id": "r-2", "x": "y"})["meta"] == {
            "tenant": "acme", "request_id": "r-2", "x": "y"}
        assert client.call_async(1, meta={"request_id": "r-3"}).result(5)["meta"] == {
            "tenant": "acme", "request_id": "r-3"}
        client.send(2, meta={"request_id": "r-4"})
        wait_until(lambda: SEEN)
        assert SEEN == [{"tenant": "acme", "request_id": "r-4"}]
    with Client(server_addr, timeout=5) as client:
        assert client.call(1) == {"meta": {}, "empty": True}  # no meta: no field on the line
        assert client.call(1, meta={"request_id": "only"})["meta"] == {"request_id": "only"}


def test_meta_travels_on_batched_lines_of_many_greenlets(server_addr: str) -> None:
    with Client(server_addr, timeout=10, meta={"tenant": "t"}) as client:
        jobs = [gevent.spawn(client.call, 1, None, meta={"request_id": f"r-{k}"}) for k in range(50)]
        gevent.joinall(jobs, raise_error=True, timeout=20)
        assert [job.value["meta"] for job in jobs] == [{"tenant": "t", "request_id": f"r-{k}"} for k in range(50)]
        conns = [conn for balancer in client._balancers.values() for pool in balancer.pools for conn in pool.conns]
        assert any(isinstance(conn, BatchingConnection) for conn in conns)  # the batching path was taken


def test_meta_from_a_plain_thread(server_addr: str) -> None:
    """The threads world (another connection class) carries meta too."""
    with Client(server_addr, timeout=5, meta={"tenant": "t"}) as client:
        result = gevent.get_hub().threadpool.spawn(client.call, 1, None, meta={"request_id": "th"}).get()
        assert result["meta"] == {"tenant": "t", "request_id": "th"}
        assert "threads" in client.describe()


def test_a_bad_meta_is_refused_by_the_client_before_anything_is_sent(server_addr: str) -> None:
    with pytest.raises(ValueError, match="keys must be"):
        Client(server_addr, meta={"Bad Key": "1"})
    with Client(server_addr, timeout=5) as client:
        bads: list[Any] = [{"tenant": "\u00e9"}, {"n": 1}]
        for bad in bads:
            with pytest.raises(ValueError):
                client.call(1, meta=bad)
            with pytest.raises(ValueError):
                client.send(2, meta=bad)
        assert client.call(1, meta={"ok": "1"})["meta"] == {"ok": "1"}  # nothing was sent before
    assert SEEN == []


def test_the_clients_meta_cannot_change_under_some_calls_only(server_addr: str) -> None:
    """Review round 3: ``client.meta`` was a plain dict while its encoded line was cached at init: a
    change (``client.meta["tenant"] = "b"``, per request in a threaded app) reached the calls that
    pass their own ``meta=`` but not the others. It is read-only, so the mistake raises at once."""
    with Client(server_addr, meta={"tenant": "a"}, tracing="off") as client:
        refused = False
        try:
            client.meta["tenant"] = "b"  # type: ignore[index]
        except TypeError:
            refused = True
        plain = client.call(1)["meta"]
        merged = client.call(1, meta={"request_id": "r"})["meta"]
        assert plain["tenant"] == merged["tenant"]  # before: "a" and "b"
        assert refused and plain == {"tenant": "a"} and merged == {"tenant": "a", "request_id": "r"}


def test_request_meta_is_read_only_with_or_without_meta(serve_meta_writer: str) -> None:
    """Review round 3: ``request.meta`` is documented read-only, but was read-only only when the request
    carried none (the shared empty mapping): a middleware that writes into it (``meta["request_id"] =
    ...``) worked for callers that sent meta and answered 500 to those that did not."""
    with Client(serve_meta_writer, timeout=5, tracing="off") as client:
        assert client.call(1) == "refused"
        assert client.call(1, meta={"tenant": "acme"}) == "refused"  # before: "accepted"


@pytest.fixture
def serve_meta_writer() -> Iterator[str]:
    def writer(request: Any) -> Any:
        try:
            request.meta["request_id"] = "made-up"
        except TypeError:
            return "refused"
        return "accepted"

    registry = Registry()
    registry.add(1, writer)
    with serve(registry, tracing="off") as server:
        yield addr(server)
