"""Issue 12, middleware: ``registry.middleware(fn)``, the server-level list (``Server(middleware=...)``
and the ``middleware`` setting), Flask's before/after/teardown hooks; order, early answers, errors,
and the teardown that always runs (success, error, 504 deadline, client gone); built-ins unwrapped;
and nothing in the call table when none is registered. Through real sockets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import gevent
import pytest

from geventtcp import BadRequest, BaseHandler, Client, FailedPrecondition, HandlerError, NotFound, Registry, Server
from geventtcp.config import Config, add_arguments
from geventtcp.errors import Code, ConfigError, DeadlineExceeded, InternalServerError, RequestCancelled
from geventtcp.middleware import build_calls
from geventtcp.protocol import Request
from tests.support import client_app
from tests.support.rawconn import RawConn, rst
from tests.support.servers import CliServer, addr
from tests.support.system import wait_until

Serve = Callable[..., Server]
Call = Callable[[Request], Any]

#: What the module-level middleware below saw (the setting imports it by name).
EVENTS: list[str] = []


def tagging(request: Request, call_next: Call) -> Any:
    """A server-level middleware named in the ``middleware`` setting: wraps the result."""
    EVENTS.append("server>")
    try:
        return {"server": call_next(request)}
    finally:
        EVENTS.append("<server")


class Echo(BaseHandler):
    """A class handler."""

    def process(self, request: Request) -> Any:
        EVENTS.append("handler")
        return request.params


def echo_fn(request: Request) -> Any:
    EVENTS.append("handler")
    return request.params


def recorder(name: str, seen: list[Any]) -> Callable[[Request, Call], Any]:
    """A middleware that records entry, result or exception (by type name), and its teardown."""

    def mw(request: Request, call_next: Call) -> Any:
        EVENTS.append(f"{name}>")
        try:
            result = call_next(request)
        except BaseException as exc:
            seen.append((name, type(exc).__name__))
            raise
        else:
            seen.append((name, result))
            return result
        finally:
            EVENTS.append(f"<{name}")

    return mw


@pytest.fixture(autouse=True)
def clear_events() -> None:
    EVENTS.clear()


def test_order_server_list_first_then_registry_in_registration_order(serve: Serve) -> None:
    seen: list[Any] = []
    reg = Registry()
    reg.add(1, Echo)
    reg.add(2, echo_fn)
    reg.middleware(recorder("a", seen))
    reg.middleware(recorder("b", seen))
    server = serve(reg, middleware=["tests.server.test_middleware:tagging"])
    with Client(addr(server), timeout=5) as client:
        for cmdid in (1, 2):  # a BaseHandler class and a plain function alike
            EVENTS.clear()
            assert client.call(cmdid, {"x": cmdid}) == {"server": {"x": cmdid}}
            assert EVENTS == ["server>", "a>", "b>", "handler", "<b", "<a", "<server"]
    assert seen == [("b", {"x": 1}), ("a", {"x": 1}), ("b", {"x": 2}), ("a", {"x": 2})]


def test_middleware_answers_early_with_data_or_an_error_and_sees_the_handlers_error(serve: Serve) -> None:
    seen: list[Any] = []
    reg = Registry()
    handled: list[int] = []

    @reg.handler(1)
    def lookup(request: Request) -> Any:
        handled.append(1)
        if request.params.get("missing"):
            raise NotFound("no such order", details={"order": 7})
        return "found"

    @reg.middleware
    def gate(request: Request, call_next: Call) -> Any:
        if request.params.get("cached"):
            return "from cache"  # the handler does not run
        if request.params.get("tenant") is None:
            raise HandlerError("tenant required", details=[{"path": "tenant", "reason": "missing"}])
        return call_next(request)

    reg.middleware(recorder("inner", seen))
    server = serve(reg)
    with Client(addr(server), timeout=5) as client:
        assert client.call(1, {"cached": True}) == "from cache"
        with pytest.raises(BadRequest) as bad:
            client.call(1, {})
        assert bad.value.code == Code.BAD_REQUEST and bad.value.details == [{"path": "tenant", "reason": "missing"}]
        assert handled == [] and seen == []
        with pytest.raises(NotFound) as missing:
            client.call(1, {"tenant": "t", "missing": True})
        assert missing.value.details == {"order": 7}
        assert client.call(1, {"tenant": "t"}) == "found"
    assert seen == [("inner", "NotFound"), ("inner", "found")]


def teardown_registry(torn: list[Any]) -> Registry:
    """Handlers for each way a request ends; a teardown_request hook records what each ended with."""
    reg = Registry()
    reg.add(1, lambda request: "ok", name="ok")
    reg.add(2, lambda request: (_ for _ in ()).throw(HandlerError("nope")), name="refuse")
    reg.add(3, lambda request: 1 / 0, name="bug")

    def sleeper(request: Request) -> Any:
        gevent.sleep(request.params.get("seconds", 5))
        return "slept"

    reg.add(4, sleeper, name="slow")
    reg.add(5, sleeper, name="slow_cancellable", cancel_on_disconnect=True)

    @reg.teardown_request
    def record(request: Request, exc: BaseException | None) -> None:
        torn.append((request.cmdid, None if exc is None else type(exc).__name__))

    return reg


def test_teardown_runs_on_success_error_bug_and_deadline(serve: Serve, hub_errors: list[Any]) -> None:
    torn: list[Any] = []
    server = serve(teardown_registry(torn))
    with Client(addr(server), timeout=5) as client:
        assert client.call(1) == "ok"
        with pytest.raises(BadRequest):
            client.call(2)
        with pytest.raises(InternalServerError):
            client.call(3)
    with RawConn(server.address) as conn:  # the 504: DeadlineReached is thrown into the handler
        assert conn.call(4, {"seconds": 5}, id=1, timeout_ms=100)["code"] == Code.DEADLINE_EXCEEDED
    wait_until(lambda: len(torn) == 4)
    assert torn == [(1, None), (2, "HandlerError"), (3, "ZeroDivisionError"), (4, "DeadlineReached")]
    assert hub_errors == []


def test_teardown_runs_when_the_client_is_gone(serve: Serve, hub_errors: list[Any]) -> None:
    torn: list[Any] = []
    server = serve(teardown_registry(torn))
    # cancel_on_disconnect: RequestCancelled is thrown in at once, and the teardown sees it.
    conn = RawConn(server.address)
    conn.request(5, {"seconds": 5}, id=1)
    wait_until(lambda: server.inflight == 1)
    rst(conn.sock)
    wait_until(lambda: torn == [(5, RequestCancelled.__name__)], timeout=3)
    # Without it the handler runs to its end (its reply has nowhere to go); then the teardown runs.
    conn = RawConn(server.address)
    conn.request(4, {"seconds": 0.3}, id=2)
    wait_until(lambda: server.inflight == 1)
    rst(conn.sock)
    wait_until(lambda: not server.connections)
    assert torn == [(5, "RequestCancelled")]
    wait_until(lambda: len(torn) == 2)
    assert torn[1] == (4, None)
    assert hub_errors == []


def test_flask_hooks_before_after_teardown(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Any] = []
    reg = Registry()
    reg.add(1, lambda request: {"n": request.params["n"]}, name="n")

    @reg.before_request
    def before(request: Request) -> Any:
        calls.append("before")
        return {"early": True} if request.params.get("early") else None

    @reg.after_request
    def after_outer(request: Request, data: Any) -> Any:
        calls.append("after_outer")
        return {**data, "outer": True}

    @reg.after_request
    def after_inner(request: Request, data: Any) -> Any:
        calls.append("after_inner")
        return {**data, "inner": True}

    @reg.teardown_request
    def teardown(request: Request, exc: BaseException | None) -> None:
        calls.append(("teardown", None if exc is None else type(exc).__name__))
        raise RuntimeError("a teardown that fails is logged, never sent")

    server = serve(reg)
    with Client(addr(server), timeout=5) as client:
        assert client.call(1, {"n": 1}) == {"n": 1, "inner": True, "outer": True}
        # Flask: after_request functions run in the reverse order of registration.
        assert calls == ["before", "after_inner", "after_outer", ("teardown", None)]
        calls.clear()
        # An early answer from before_request skips the handler; after_request still runs (Flask).
        assert client.call(1, {"early": True}) == {"early": True, "inner": True, "outer": True}
        assert calls == ["before", "after_inner", "after_outer", ("teardown", None)]
        calls.clear()
        with pytest.raises(InternalServerError):  # KeyError in the handler: no after_request, a teardown
            client.call(1, {})
        assert calls == ["before", ("teardown", "KeyError")]
    assert "teardown_request function" in caplog.text


def test_builtins_are_not_wrapped(serve: Serve) -> None:
    """A middleware that refuses everything leaves PING, LIST, STATS and AUTH working."""
    reg = Registry()
    reg.add(1, echo_fn)

    @reg.middleware
    def deny(request: Request, call_next: Call) -> Any:
        raise HandlerError("denied", Code.FAILED_PRECONDITION)

    server = serve(reg, auth_token="s3cret")
    with Client(addr(server), timeout=5, auth_token="s3cret") as client:
        assert client.ping()["pong"] is True
        assert [item["cmdid"] for item in client.list()] == [1]
        assert client.stats()["connections"] >= 1
        with pytest.raises(FailedPrecondition) as denied:
            client.call(1)
        assert denied.value.code == Code.FAILED_PRECONDITION


def test_without_middleware_the_table_holds_the_registered_callables(serve: Serve) -> None:
    reg = Registry()
    reg.add(1, echo_fn)
    server = serve(reg)
    assert server.calls[1] is echo_fn
    assert build_calls(reg) == {1: echo_fn}
    reg.middleware(tagging)
    wrapped = build_calls(reg)
    assert wrapped[1] is not echo_fn
    assert wrapped[1](Request(None, b"", 1, {"k": 1}, 0)) == {"server": {"k": 1}}


def test_middleware_setting_from_the_cli_env_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--middleware", "tests.server.test_middleware:tagging", "--middleware", "a.b:c"])
    assert args.middleware == ["tests.server.test_middleware:tagging", "a.b:c"]
    config = Config()
    config.update({"middleware": "x:y, z:w"}, "env")
    assert config.freeze().middleware == ["x:y", "z:w"]
    with pytest.raises(ConfigError, match="module:attr"):
        Config().update({"middleware": ["no_colon"]}, "file")
    server = Server(Registry(), bind="127.0.0.1:0", middleware=["tests.server.test_middleware:missing"])
    with pytest.raises(ConfigError, match="missing"):  # imported when the server (worker) starts
        server.start()
    assert not server.started


def test_a_deadline_in_middleware_after_the_handler_still_504s(serve: Serve, hub_errors: list[Any]) -> None:
    """The deadline counts the middleware too: one slow in its own teardown is stopped at the deadline."""
    done: list[str] = []
    reg = Registry()
    reg.add(1, lambda request: "fast", name="fast")

    @reg.middleware
    def slow_teardown(request: Request, call_next: Call) -> Any:
        try:
            return call_next(request)
        finally:
            try:
                gevent.sleep(5)
            finally:
                done.append("teardown")

    server = serve(reg)
    with Client(addr(server), timeout=5, retries=0) as client:
        with pytest.raises(DeadlineExceeded):
            client.call(1, timeout=0.2)
    wait_until(lambda: done == ["teardown"])
    assert hub_errors == []


@pytest.mark.subprocess
def test_the_cli_flag_names_server_level_middleware_imported_in_the_worker(tmp_path: Any) -> None:
    config = tmp_path / "geventtcp.toml"
    config.write_text('middleware = ["tests.server.test_middleware:tagging"]\n')
    for extra in (["--middleware", "tests.server.test_middleware:tagging"], ["-c", str(config)]):
        server = CliServer([sys.executable, "-m", "geventtcp", "serve", "tests.support.client_app", "--bind",
                            "127.0.0.1:0", *extra])
        try:
            with Client(server.address, timeout=5) as client:
                assert client.call(client_app.ECHO, {"a": 1}) == {"server": {"a": 1}}
                assert client.ping()["pong"] is True  # built-ins unwrapped
        finally:
            server.stop()


def test_every_teardown_runs_when_the_deadline_lands_in_one_of_them(serve: Serve, hub_errors: list[Any]) -> None:
    """Review round 3: a teardown_request that waits past the deadline gets DeadlineReached (a
    BaseException); the teardowns after it (Flask runs them newest first, so the oldest, typically
    ``Session.remove()``, runs last) must still run. The request is still answered 504."""
    torn: list[str] = []
    reg = Registry()
    reg.add(1, lambda request: "fast", name="fast")
    reg.add(2, lambda request: 1 / 0, name="bug")

    @reg.teardown_request
    def remove_session(request: Request, exc: BaseException | None) -> None:  # registered first: runs last
        torn.append(f"remove_session {request.cmdid}")

    @reg.teardown_request
    def slow_flush(request: Request, exc: BaseException | None) -> None:
        try:
            gevent.sleep(5)
        finally:
            torn.append(f"slow_flush {request.cmdid}")

    server = serve(reg)
    with Client(addr(server), timeout=5, retries=0) as client:
        with pytest.raises(DeadlineExceeded):  # success, then the deadline in a teardown
            client.call(1, timeout=0.2)
        wait_until(lambda: len(torn) >= 2)
        with pytest.raises(DeadlineExceeded):  # an error, then the deadline in a teardown
            client.call(2, timeout=0.2)
        wait_until(lambda: len(torn) >= 4)
    assert torn == ["slow_flush 1", "remove_session 1", "slow_flush 2", "remove_session 2"]
    assert hub_errors == []
