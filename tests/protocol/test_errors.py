"""The error table: every non-zero code maps to one exception class; retryable means 'not processed'."""

from __future__ import annotations

from geventtcp import errors
from geventtcp.errors import ERROR_CLASSES, RETRYABLE_CODES, Code, RemoteError, remote_error


def test_every_error_code_has_exactly_one_class() -> None:
    assert set(ERROR_CLASSES) == {c for c in Code if c != Code.OK}
    assert len(set(ERROR_CLASSES.values())) == len(ERROR_CLASSES)


def test_remote_error_from_reply() -> None:
    exc = remote_error({"code": 404, "cmdid": 9, "msg": "unknown cmdid 9"})
    assert isinstance(exc, errors.UnknownCommand) and exc.code == 404 and exc.msg == "unknown cmdid 9"
    assert str(exc) == "[404] unknown cmdid 9" and not exc.retryable
    assert remote_error({"code": 503, "msg": "draining"}).retryable
    odd = remote_error({"code": 799, "msg": "future code"})
    assert type(odd) is RemoteError and odd.code == 799
    assert remote_error({"code": "x"}).code == -1


def test_retryable_codes_promise_the_handler_did_not_run() -> None:
    assert RETRYABLE_CODES == {Code.UNAVAILABLE}


def test_hierarchy() -> None:
    assert issubclass(errors.CallTimeout, TimeoutError) and issubclass(errors.CallTimeout, errors.MaybeExecuted)
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.GeventTCPError)


def test_client_facing_exceptions_are_exported_from_the_package() -> None:
    """``from geventtcp import NotSent, ...`` works for every transport error a Client raises and
    every RemoteError subclass of the code table, and they are the errors module's own classes."""
    import geventtcp

    transport = ["TransportError", "ConnectError", "NotSent", "Unprocessed", "MaybeExecuted", "CallTimeout"]
    remote = [cls.__name__ for cls in ERROR_CLASSES.values()]
    for name in [*transport, *remote, "RemoteError", "GeventTCPError"]:
        assert name in geventtcp.__all__, name
        assert getattr(geventtcp, name) is getattr(errors, name), name
