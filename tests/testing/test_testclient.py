"""geventtcp.testing.TestClient: in-process calls through the real request path (a real Server in a thread
of its own, a real Client), from the main thread, concurrent greenlets, a thread pool and a patched process."""

from __future__ import annotations

import contextvars
import os
import socket
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gevent
import pytest

from geventtcp import Registry
from geventtcp.errors import (
    BadRequest,
    ConfigError,
    DeadlineExceeded,
    HandlerError,
    InternalServerError,
    NotFound,
    UnknownCommand,
)
from geventtcp.protocol import Builtin
from geventtcp.server.server import Server
from geventtcp.testing import TestClient
from tests.support.system import run_python, wait_until

#: A per-request value: the server runs each request in a fresh copy of its base context.
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("current", default=None)


def _registry() -> Registry:
    reg = Registry()
    reg.add(1, lambda req: req.params, name="echo")
    reg.add(2, _not_found, name="lookup")
    reg.add(3, _crash, name="crash")
    reg.add(4, _nap, name="nap")
    reg.add(5, _invalid, name="invalid")
    reg.add(6, _own_value, name="own_value")
    reg.add(7, _gather(8), name="gather")
    return reg


def _not_found(req: Any) -> Any:
    raise NotFound("no such order", details={"order_id": req.params.get("id")})


def _crash(req: Any) -> Any:
    raise RuntimeError("bug")


def _nap(req: Any) -> Any:
    gevent.sleep(req.params.get("seconds", 0))
    return "rested"


def _invalid(req: Any) -> Any:
    raise HandlerError("quantity must be positive", details=[{"field": "quantity"}])


def _own_value(req: Any) -> Any:
    """Set the request's ContextVar, yield to the other requests, return what it holds then."""
    CURRENT.set(req.params["me"])
    gevent.sleep(0.01)
    return CURRENT.get()


def _gather(n: int) -> Any:
    """A handler that answers only once ``n`` requests are inside it at the same time (or fails after 10 s):
    proof that concurrent calls run concurrently in the server, not one after another."""
    state: dict[str, Any] = {"inside": 0}

    def handler(req: Any) -> Any:
        if "all_in" not in state:  # made in the server's thread, where its hub is
            state["all_in"] = gevent.event.Event()
        state["inside"] += 1
        if state["inside"] >= n:
            state["all_in"].set()
        if not state["all_in"].wait(10):
            raise HandlerError(f"only {state['inside']} of {n} requests arrived together")
        return req.params["i"]

    return handler


@pytest.fixture
def tc() -> Iterator[TestClient]:
    with TestClient(_registry()) as client:
        yield client


def test_call_returns_the_data_through_a_real_server(tc: TestClient) -> None:
    assert tc.call(1, {"a": [1, 2]}) == {"a": [1, 2]}
    assert tc.call(1) == {}
    assert isinstance(tc.server, Server) and tc.server.started
    assert tc.server.stats.commands[1].count == 2  # counted by the server's request path


def test_errors_raise_the_client_exception_classes_with_code_msg_and_details(tc: TestClient) -> None:
    with pytest.raises(NotFound) as found:
        tc.call(2, {"id": 42})
    assert (found.value.code, found.value.msg, found.value.details) == (1005, "no such order", {"order_id": 42})
    with pytest.raises(BadRequest) as bad:
        tc.call(5)
    assert bad.value.details == [{"field": "quantity"}]
    with pytest.raises(InternalServerError) as crashed:
        tc.call(3)
    assert crashed.value.msg == "internal error"  # the traceback stays in the server's log
    with pytest.raises(UnknownCommand):
        tc.call(999)


def test_reply_returns_the_raw_reply_object(tc: TestClient) -> None:
    assert tc.reply(1, {"x": 1}, id="r1") == {"code": 0, "cmdid": 1, "data": {"x": 1}, "id": "r1"}
    reply = tc.reply(2, {"id": 7})
    assert reply["code"] == 1005 and reply["details"] == {"order_id": 7} and reply["msg"] == "no such order"
    assert tc.reply(999)["code"] == 404
    assert tc.reply(1, {"x": 1}, meta={"request_id": "abc"})["data"] == {"x": 1}  # v1 ignores unknown fields


def test_builtins_run(tc: TestClient) -> None:
    assert tc.ping()["pong"] is True
    names = {entry["cmdid"]: entry["name"] for entry in tc.list()}
    assert names == {1: "echo", 2: "lookup", 3: "crash", 4: "nap", 5: "invalid", 6: "own_value", 7: "gather"}
    tc.call(1)
    assert tc.stats()["commands"]["1"]["count"] == 1
    assert tc.call(Builtin.PING)["pong"] is True


def test_settings_reach_the_server() -> None:
    with TestClient(_registry(), handler_timeout=0.05) as tc, pytest.raises(DeadlineExceeded):
        tc.call(4, {"seconds": 5})


def test_an_auth_token_is_sent_by_both_clients() -> None:
    with TestClient(_registry(), auth_token="sesame") as tc:
        assert tc.call(1, {"a": 1}) == {"a": 1}
        assert tc.reply(1, {"a": 2})["data"] == {"a": 2}


def test_concurrent_greenlets_each_get_their_own_request_context(tc: TestClient) -> None:
    calls = [gevent.spawn(tc.call, 6, {"me": i}) for i in range(8)]
    gevent.joinall(calls, raise_error=True)
    assert [g.value for g in calls] == list(range(8))
    together = [gevent.spawn(tc.call, 7, {"i": i}) for i in range(8)]
    gevent.joinall(together, raise_error=True)
    assert sorted(g.value for g in together) == list(range(8))


def test_calls_from_a_thread_pool_while_the_main_thread_blocks(tc: TestClient) -> None:
    """The embedded-server deadlock of issue 13: the main thread waits on futures (not in gevent)."""
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(tc.call, 7, {"i": i}) for i in range(8)]
        assert sorted(f.result(timeout=20) for f in futures) == list(range(8))
        assert pool.submit(tc.call, 1, {"t": 1}).result(timeout=20) == {"t": 1}


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_bad_setting_raises_from_the_constructor() -> None:
    before = _os_threads()
    with pytest.raises(ConfigError, match="max_connections"):
        TestClient(_registry(), max_connections=-1)
    wait_until(lambda: _os_threads() <= before)  # the server's thread ended (it was joined: at once)


def test_a_bad_client_option_raises_and_stops_the_server_it_started() -> None:
    """Review round 3: the server's thread is running when the Client is made; a client option the
    Client refuses must not leave that thread (and its listening port) behind for the test session."""
    before = _os_threads()
    with pytest.raises(TypeError, match="no_such_option"):
        TestClient(_registry(), client_options={"no_such_option": 1})
    wait_until(lambda: _os_threads() <= before, timeout=5)


def test_close_stops_the_server_and_its_thread() -> None:
    tc = TestClient(_registry())
    task = f"/proc/self/task/{tc._thread.native_id}"
    assert os.path.exists(task)
    host, port = tc.server.address[:2]
    tc.call(1)
    tc.close()
    assert not tc.server.started
    wait_until(lambda: not os.path.exists(task))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()
    tc.close()  # again: nothing


def test_an_app_spec_is_loaded_as_geventtcp_serve_loads_it() -> None:
    with TestClient("tests.support.client_app") as tc:
        assert tc.list()


@pytest.mark.subprocess
def test_in_a_monkey_patched_process_from_greenlets_and_threads() -> None:
    result = run_python(textwrap.dedent("""
        from gevent import monkey; monkey.patch_all()
        import threading, gevent
        from concurrent.futures import ThreadPoolExecutor
        from geventtcp import Registry
        from geventtcp.testing import TestClient
        reg = Registry()
        reg.add(1, lambda req: (gevent.sleep(0.01), req.params)[1], name="echo")
        with TestClient(reg) as tc:
            glets = [gevent.spawn(tc.call, 1, {"i": i}) for i in range(20)]
            gevent.joinall(glets, raise_error=True)
            with ThreadPoolExecutor(4) as pool:
                threaded = list(pool.map(lambda i: tc.call(1, {"i": i}), range(8)))
            print(sorted(g.value["i"] for g in glets) == list(range(20)), [r["i"] for r in threaded])
    """), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "True [0, 1, 2, 3, 4, 5, 6, 7]"


def _hooked_registry(events: list[tuple[Any, ...]]) -> Registry:
    """An application whose per-worker resource (a dict) comes from its lifecycle hooks, as a real one's pool."""
    reg = Registry()
    resource: dict[str, Any] = {}

    @reg.hook("post_worker_init")
    def open_resource(worker: Any) -> None:
        resource["pool"] = "open"
        events.append(("post_worker_init", worker.pid, worker.slot, _thread_id()))

    @reg.hook("worker_exit")
    def close_resource(server: Any, worker: Any) -> None:
        resource["pool"] = "closed"
        events.append(("worker_exit", server.pid, worker.exit_reason, _thread_id()))

    reg.add(1, lambda req: {"pool": resource.get("pool"), "thread": _thread_id()}, name="uses_the_resource")
    return reg


def _thread_id() -> int:
    from geventtcp.testing.client import _get_native_id

    return int(_get_native_id())


def test_the_applications_worker_hooks_run_in_the_server_thread_at_start_and_close() -> None:
    events: list[tuple[Any, ...]] = []
    with TestClient(_hooked_registry(events)) as tc:
        served = tc.call(1)
        assert served["pool"] == "open"                     # post_worker_init ran before the first request
        assert events == [("post_worker_init", os.getpid(), 0, served["thread"])]
    # worker_exit ran once the server drained, in the server's thread (where the resource was made)
    assert events[1:] == [("worker_exit", os.getpid(), "shutdown", served["thread"])]


def test_a_failing_post_worker_init_fails_the_constructor_and_still_runs_worker_exit() -> None:
    from geventtcp.hooks import HookFailedError

    events: list[tuple[Any, ...]] = []
    reg = _hooked_registry(events)

    @reg.hook("post_worker_init")
    def fails(worker: Any) -> None:
        raise RuntimeError("database down")

    with pytest.raises(HookFailedError, match="database down"):
        TestClient(reg)
    assert [e[:3] for e in events] == [("post_worker_init", os.getpid(), 0),
                                       ("worker_exit", os.getpid(), "boot_error")]


def test_worker_hooks_can_be_left_out() -> None:
    events: list[tuple[Any, ...]] = []
    with TestClient(_hooked_registry(events), worker_hooks=False) as tc:
        assert tc.call(1)["pool"] is None
    assert events == []
