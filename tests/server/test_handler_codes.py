"""Handlers answer with application codes only (issue 10, item 6, and the toolkit issue's codes).

A handler could forge transport meanings with ``HandlerError(msg, code)``: 503 ("not processed, safe
to retry") made ``Client.call`` run a non-idempotent handler three times, 0 gave a success without
data, 404 and 401 read as "unknown cmdid" and "AUTH failed". Now a handler can raise only the
application codes (each with one meaning, mapped to one client exception) plus 400, with optional JSON
``details``; anything else is refused when the error is built or becomes a 500 with the request's id.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from geventtcp import Registry
from geventtcp.client import Client
from geventtcp.errors import (
    APPLICATION_CODES,
    ERROR_CLASSES,
    HANDLER_CODES,
    RETRYABLE_CODES,
    AlreadyExists,
    ApplicationError,
    BadRequest,
    Code,
    DependencyUnavailable,
    HandlerError,
    InternalServerError,
    NotFound,
    ServiceUnavailable,
    UnknownCommand,
    remote_error,
)
from tests.support.rawconn import RawConn

TRANSPORT_CODES = [Code.OK, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.UNKNOWN_COMMAND,
                   Code.REQUEST_TIMEOUT, Code.TOO_LARGE, Code.INTERNAL, Code.UNAVAILABLE,
                   Code.DEADLINE_EXCEEDED, 200, -1, 799]


@pytest.mark.parametrize("code", TRANSPORT_CODES)
def test_handler_error_refuses_a_transport_code_at_construction(code: int) -> None:
    with pytest.raises(ValueError) as info:
        HandlerError("dependency down", code)
    assert "NOT_FOUND" in str(info.value) and str(int(Code.NOT_FOUND)) in str(info.value)


@pytest.mark.parametrize("code", [True, "1005", 1005.0, None])
def test_handler_error_code_must_be_an_int(code: Any) -> None:
    with pytest.raises(TypeError):
        HandlerError("x", code)


def test_handler_codes_are_the_application_codes_plus_400() -> None:
    assert HANDLER_CODES == APPLICATION_CODES | {Code.BAD_REQUEST}
    assert all(code >= 1000 for code in APPLICATION_CODES)  # a range of their own, apart from HTTP's
    assert not HANDLER_CODES & RETRYABLE_CODES  # no handler reply reads as "not processed"
    assert HandlerError("bad").code == Code.BAD_REQUEST
    exc = HandlerError("gone", Code.NOT_FOUND, details={"user": 7})
    assert (exc.code, exc.msg, exc.details) == (Code.NOT_FOUND, "gone", {"user": 7})
    for code in APPLICATION_CODES:
        cls = ERROR_CLASSES[code]
        assert issubclass(cls, ApplicationError) and issubclass(cls, HandlerError)
        assert cls("m").code == code and not cls("m").retryable


def _client(server: Any, **kw: Any) -> Client:
    host, port = server.address[:2]
    return Client(f"{host}:{port}", timeout=5, **kw)


def test_forged_503_from_a_non_idempotent_handler_runs_it_once(serve: Any) -> None:
    """The issue's case: HandlerError("dependency down", 503) made the client resend it twice."""
    runs: list[int] = []
    reg = Registry()

    def charge(req: Any) -> Any:
        runs.append(1)
        raise HandlerError("dependency down", 503)

    reg.add(10, charge)
    server = serve(reg)
    with _client(server, retries=2) as client, pytest.raises(InternalServerError):
        client.call(10, {"amount": 5})
    assert len(runs) == 1


@pytest.mark.parametrize("code", [0, 404, 401, 503])
def test_a_transport_code_slipped_past_construction_becomes_a_500_with_the_id(serve: Any, code: int) -> None:
    """Even a HandlerError whose code was changed after it was built: 500, id kept, connection kept."""
    reg = Registry()

    def forge(req: Any) -> Any:
        exc = HandlerError("forged")
        exc.code = code
        raise exc

    reg.add(10, forge)
    server = serve(reg)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 10, "id": 3}) == {"code": 500, "cmdid": 10, "id": 3, "msg": "internal error"}
        assert c.call({"cmdid": 10, "id": 4})["code"] == 500


@pytest.mark.parametrize("code", sorted(APPLICATION_CODES))
def test_each_application_code_reaches_the_client_as_its_class_with_details(serve: Any, code: int) -> None:
    reg = Registry()
    reg.add(10, lambda req: (_ for _ in ()).throw(HandlerError("why", code, details={"k": [1, "v"]})))
    reg.add(11, lambda req: (_ for _ in ()).throw(ERROR_CLASSES[code]("raised as the class")))
    server = serve(reg)
    with _client(server) as client:
        with pytest.raises(ERROR_CLASSES[code]) as info:
            client.call(10)
        assert (info.value.code, info.value.msg, info.value.details) == (code, "why", {"k": [1, "v"]})
        assert not info.value.retryable
        with pytest.raises(ERROR_CLASSES[code]) as info2:
            client.call(11)
        assert info2.value.details is None and info2.value.msg == "raised as the class"


def test_dependency_unavailable_is_not_retried_the_handler_ran(serve: Any) -> None:
    runs: list[int] = []
    reg = Registry()

    def charge(req: Any) -> Any:
        runs.append(1)
        raise DependencyUnavailable("payments down", details={"dependency": "payments"})

    reg.add(10, charge)
    server = serve(reg)
    with _client(server, retries=3) as client, pytest.raises(DependencyUnavailable) as info:
        client.call(10, idempotent=False)
    assert len(runs) == 1 and info.value.details == {"dependency": "payments"}


def test_400_with_details_from_a_handler(serve: Any) -> None:
    reg = Registry()
    reg.add(10, lambda req: (_ for _ in ()).throw(HandlerError("params.n must be > 0", details={"field": "n"})))
    server = serve(reg)
    with _client(server) as client, pytest.raises(BadRequest) as info:
        client.call(10)
    assert info.value.details == {"field": "n"} and info.value.code == 400


def test_details_without_json_form_give_a_500_with_the_id(serve: Any) -> None:
    reg = Registry()
    reg.add(10, lambda req: (_ for _ in ()).throw(HandlerError("x", Code.NOT_FOUND, details={"s": {1, 2}})))
    reg.add(11, lambda req: (_ for _ in ()).throw(HandlerError("x", Code.NOT_FOUND, details=float("nan"))))
    server = serve(reg)
    with RawConn(server.address) as c:
        for cmdid in (10, 11):
            reply = c.call({"cmdid": cmdid, "id": "r1"})
            assert reply["code"] == 500 and reply["id"] == "r1" and "details" not in reply
        assert c.call({"cmdid": 10, "id": 2})["id"] == 2


def test_downstream_transport_errors_raised_by_a_handler_become_500(serve: Any) -> None:
    """A handler calling another service may let its RemoteError escape: a transport code from
    downstream (404 unknown cmdid, 503 not processed there) says nothing true about *this* request,
    so it is a 500; an application error from downstream passes through with its code and details."""
    reg = Registry()
    downstream = {
        10: remote_error({"code": 404, "cmdid": 9, "msg": "unknown cmdid 9"}),
        11: remote_error({"code": 503, "cmdid": 9, "msg": "draining"}),
        12: remote_error({"code": 400, "cmdid": 9, "msg": "bad params downstream"}),
        13: remote_error({"code": int(Code.NOT_FOUND), "cmdid": 9, "msg": "no user", "details": {"u": 1}}),
    }
    assert isinstance(downstream[10], UnknownCommand) and isinstance(downstream[11], ServiceUnavailable)
    for cmdid, exc in downstream.items():
        reg.add(cmdid, lambda req, exc=exc: (_ for _ in ()).throw(exc))
    server = serve(reg)
    with _client(server, retries=2) as client:
        for cmdid in (10, 11, 12):
            with pytest.raises(InternalServerError):
                client.call(cmdid)
        with pytest.raises(NotFound) as info:
            client.call(13)
        assert info.value.details == {"u": 1} and info.value.msg == "no user"


def test_details_on_a_plain_remote_error_reply() -> None:
    exc = remote_error({"code": int(Code.ALREADY_EXISTS), "msg": "dup", "details": ["a"]})
    assert isinstance(exc, AlreadyExists) and exc.details == ["a"]
    assert remote_error({"code": 500, "msg": "x"}).details is None


class _AsDict:
    """An object simplejson encodes through its ``_asdict`` method (as it does a namedtuple)."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value

    def _asdict(self) -> dict[str, Any]:
        return self.value


def test_a_handler_error_message_with_a_lone_surrogate_keeps_the_connection(serve: Any) -> None:
    """``NotFound(f"no file {name}")`` with ``name`` from ``os.fsdecode()`` (a lone surrogate): the
    reply must be strict JSON, or the client's reader fails the connection and every caller on it."""
    name = os.fsdecode(b"caf\xe9.txt")
    reg = Registry()
    reg.add(10, lambda req: (_ for _ in ()).throw(NotFound(f"no file {name}", details={"n": 1})))
    reg.add(11, lambda req: (_ for _ in ()).throw(HandlerError(f"bad name {name}")))
    reg.add(12, lambda req: req.params)
    server = serve(reg)
    with _client(server, pool_size=1, retries=0) as client:
        with pytest.raises(NotFound) as info:
            client.call(10)
        assert info.value.msg == "no file caf\\udce9.txt" and info.value.details == {"n": 1}
        with pytest.raises(BadRequest) as info2:
            client.call(11)
        assert info2.value.msg == "bad name caf\\udce9.txt"
        assert client.call(12, {"after": 1}) == {"after": 1}
        (pools,) = client.describe().values()
        assert pools[0]["connections"] == 1


def test_a_handler_error_message_without_json_form_is_answered_with_its_text(serve: Any) -> None:
    """A msg that is not a str (typed ``str``, but nothing stops a handler): answered with its
    str(), the code and the id, never a lost connection."""
    reg = Registry()
    reg.add(10, lambda req: (_ for _ in ()).throw(HandlerError(frozenset({1}), Code.NOT_FOUND)))  # type: ignore[arg-type]
    server = serve(reg)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 10, "id": 1}) == {"code": 1005, "cmdid": 10, "id": 1, "msg": "frozenset({1})"}
        assert c.call({"cmdid": 10, "id": 2})["id"] == 2


def test_details_with_a_lone_surrogate_inside_an_asdict_object_give_a_500(serve: Any) -> None:
    """The surrogate check must look inside what the encoder does (an ``_asdict`` object), as
    the success path does: otherwise the line reaches the client and fails the connection."""
    reg = Registry()
    reg.add(10, lambda req: (_ for _ in ()).throw(NotFound("x", details=_AsDict({"f": "\udcff"}))))
    reg.add(11, lambda req: (_ for _ in ()).throw(NotFound("x", details=_AsDict({"f": "ok"}))))
    server = serve(reg)
    with _client(server, pool_size=1, retries=0) as client:
        with pytest.raises(InternalServerError):
            client.call(10)
        with pytest.raises(NotFound) as info:
            client.call(11)
        assert info.value.details == {"f": "ok"}
        (pools,) = client.describe().values()
        assert pools[0]["connections"] == 1


class _BareHandlerError(HandlerError):
    """A subclass whose ``__init__`` skips HandlerError's: no ``code``, no ``msg``."""

    def __init__(self) -> None:
        Exception.__init__(self, "bare")


class _NoStr:
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_a_handler_error_without_code_or_with_an_unprintable_msg_keeps_the_connection(serve: Any) -> None:
    """Whatever a HandlerError subclass lacks, the error path answers (500 without a code, the
    code with a placeholder msg) and keeps the connection: the reply path must not raise."""
    reg = Registry()
    reg.add(10, lambda req: (_ for _ in ()).throw(_BareHandlerError()))

    def unprintable(req: Any) -> Any:
        exc = HandlerError("x", Code.NOT_FOUND)
        exc.msg = _NoStr()  # type: ignore[assignment]
        raise exc

    reg.add(11, unprintable)
    server = serve(reg)
    with RawConn(server.address) as c:
        assert c.call({"cmdid": 10, "id": 1}) == {"code": 500, "cmdid": 10, "id": 1, "msg": "internal error"}
        reply = c.call({"cmdid": 11, "id": 2})
        assert reply["code"] == 1005 and reply["id"] == 2 and "_NoStr" in reply["msg"]
        assert c.call({"cmdid": 10, "id": 3})["id"] == 3


def test_a_middleware_refuses_a_caller_with_the_application_auth_codes(serve: Any) -> None:
    """Auth checked by the application (an API key in meta) cannot answer 401/403, the transport's
    AUTH and protected-mode codes; it has NOT_AUTHENTICATED (1016) and ACCESS_DENIED (1007), after
    gRPC's UNAUTHENTICATED (16) and PERMISSION_DENIED (7), and the handler does not run."""
    from geventtcp.errors import AccessDenied, NotAuthenticated

    runs: list[int] = []
    reg = Registry()

    @reg.middleware
    def api_key(request: Any, call_next: Any) -> Any:
        key = request.meta.get("api_key")
        if key is None:
            raise NotAuthenticated("api_key required", details={"meta": "api_key"})
        if key != "writer":
            raise AccessDenied("read-only key", details={"api_key": key})
        return call_next(request)

    reg.add(10, lambda req: runs.append(1))
    server = serve(reg)
    with _client(server, retries=3) as client:
        with pytest.raises(NotAuthenticated) as missing:
            client.call(10)
        with pytest.raises(AccessDenied) as denied:
            client.call(10, meta={"api_key": "reader"})
        assert client.call(10, meta={"api_key": "writer"}) is None
    assert (missing.value.code, missing.value.details) == (Code.NOT_AUTHENTICATED, {"meta": "api_key"})
    assert (denied.value.code, denied.value.details) == (Code.ACCESS_DENIED, {"api_key": "reader"})
    assert (Code.NOT_AUTHENTICATED, Code.ACCESS_DENIED) == (1016, 1007)
    assert not missing.value.retryable and not denied.value.retryable
    assert runs == [1]
