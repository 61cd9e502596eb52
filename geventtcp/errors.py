"""Status codes of the wire protocol and the one exception hierarchy, mapped to each other in one table.

Two kinds of code share the ``code`` field, in ranges that cannot be confused:

* **Transport codes** (HTTP-like, 400-504) are the server's own: it alone decides that a line was
  not a request, that a cmdid is unknown, that a request was not processed (503, the one code a
  client may resend any request after) or ran out of time. A handler cannot produce them: a reply
  a client reads as "not processed" (or as success, or "unknown cmdid", or "AUTH failed") must
  never come from code that ran.
* **Application codes** (1000 and up) are what a handler may answer with, one meaning each, after
  gRPC's status codes: the last digits are gRPC's number for the same meaning (NOT_FOUND is gRPC's
  5, so 1005), and every one says *the handler ran*. Numbers of 1000 and more are outside HTTP's
  range, so no proxy, log reader or client mistakes one for a transport meaning. A handler raises
  :class:`HandlerError` with one of them (or 400, for invalid params, as before), or the mapped
  exception class itself (:class:`NotFound`, ...), which is what a handler calling another
  geventtcp service gets and may let through. Each may carry a JSON ``details`` payload, sent in
  the reply's ``details`` field and exposed on the client exception.

What a handler raises and what the client sees: a :class:`HandlerError` with a code outside
:data:`HANDLER_CODES` is refused when built (``ValueError``; ``TypeError`` for a non-int), and one
altered afterwards becomes a ``500 internal error`` (with the request's id), as do details without
a JSON form. A :class:`RemoteError` with a *transport* code escaping a handler (say
:class:`UnknownCommand` or :class:`ServiceUnavailable` from a downstream call) is not a
HandlerError: it is any other exception, so a 500: the downstream service's transport meaning is
not true of this request (its 503 says the *downstream* request did not run, not this one). A
handler that wants to say so raises :class:`DependencyUnavailable`.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "Code",
    "RETRYABLE_CODES",
    "GeventTCPError",
    "ConfigError",
    "RegistryError",
    "RequestCancelled",
    "ProtocolError",
    "HandlerError",
    "APPLICATION_CODES",
    "HANDLER_CODES",
    "TransportError",
    "ConnectError",
    "ConnectionClosedError",
    "CallTimeout",
    "NotSent",
    "Unprocessed",
    "MaybeExecuted",
    "RemoteError",
    "BadRequest",
    "Unauthenticated",
    "PermissionDenied",
    "UnknownCommand",
    "RequestTimeout",
    "RequestTooLarge",
    "InternalServerError",
    "ServiceUnavailable",
    "DeadlineExceeded",
    "ApplicationError",
    "NotFound",
    "AlreadyExists",
    "AccessDenied",
    "NotAuthenticated",
    "FailedPrecondition",
    "Aborted",
    "ResourceExhausted",
    "DependencyUnavailable",
    "ERROR_CLASSES",
    "remote_error",
]


class Code(enum.IntEnum):
    """Every ``code`` a reply can carry: 0 for success, HTTP-like transport codes, application codes.

    This enum is the single definition: the server builds replies from it, the client maps it to
    exception classes through :data:`ERROR_CLASSES`, and the README's table documents it.
    """

    OK = 0
    #: The line is not a valid request: bad JSON or UTF-8, wrong field types, limits on numbers/depth.
    BAD_REQUEST = 400
    #: Authentication is required (or the credentials are wrong).
    UNAUTHENTICATED = 401
    #: The peer is not allowed (protected mode: non-loopback peer with no auth configured).
    PERMISSION_DENIED = 403
    #: No handler is registered for the cmdid.
    UNKNOWN_COMMAND = 404
    #: The request line was not completed in time (slowloris); the connection is closed.
    REQUEST_TIMEOUT = 408
    #: The request line is longer than ``max_line_bytes`` (or the reply than ``max_reply_bytes``).
    TOO_LARGE = 413
    #: The handler raised, or its result could not be serialized.
    INTERNAL = 500
    #: Draining, shutting down, or over a connection/in-flight/per-command concurrency limit; the
    #: handler did not run, so retrying is safe.
    UNAVAILABLE = 503
    #: The handler did not finish before the request's deadline (it may have had side effects).
    DEADLINE_EXCEEDED = 504

    # Application codes: raised by handlers only; the handler ran. 1000 + gRPC's number.
    #: The thing the request names does not exist. Retry: not unchanged.
    NOT_FOUND = 1005
    #: What the request would create exists already. Retry: not unchanged.
    ALREADY_EXISTS = 1006
    #: The application knows the caller but does not let it do this (say, a read-only API key on a
    #: write). Retry: not with the same credentials.
    ACCESS_DENIED = 1007
    #: A limit or quota of the application is used up. Retry: after a backoff, if idempotent.
    RESOURCE_EXHAUSTED = 1008
    #: The system is not in the state the request needs (say, a non-empty directory to delete).
    #: Retry: not until the state is fixed.
    FAILED_PRECONDITION = 1009
    #: A concurrency conflict (a transaction aborted, a compare-and-set lost). Retry: the whole
    #: read-modify-write sequence, at a higher level.
    ABORTED = 1010
    #: A dependency of the handler (database, downstream service) is down; the handler ran and may
    #: have done part of its work. Retry: after a backoff, if idempotent.
    DEPENDENCY_UNAVAILABLE = 1014
    #: The application's own credentials (say, an API key in the request's meta) are missing or not valid; the
    #: handler's middleware checked them (401 is the server's AUTH). Retry: not without valid ones.
    NOT_AUTHENTICATED = 1016


#: Codes that promise the handler did not run, so any request may be sent again (gRPC A6's rule).
RETRYABLE_CODES = frozenset({Code.UNAVAILABLE})
#: The codes of errors only a handler produces (each says the handler ran; none is retryable).
APPLICATION_CODES = frozenset(code for code in Code if code >= 1000)
#: What a handler may answer with: the application codes, and 400 for params it finds invalid.
HANDLER_CODES = APPLICATION_CODES | {Code.BAD_REQUEST}


class GeventTCPError(Exception):
    """Root of every exception this library raises on purpose."""


class ConfigError(GeventTCPError):
    """A setting has an invalid value, or the configuration could not be loaded."""


class RegistryError(GeventTCPError):
    """A cmdid was registered twice, or a handler is not usable."""


class RequestCancelled(BaseException):
    """Thrown into a handler registered with ``cancel_on_disconnect=True`` when its connection is gone.

    A BaseException, like ``GreenletExit``, so ``except Exception`` in the handler cannot eat it. A
    handler may also raise it after seeing ``request.cancelled``: on a closed connection it ends the
    request quietly (nobody is left to answer), elsewhere it is a 500 like any other exception.
    """


class ProtocolError(GeventTCPError):
    """A line broke the wire protocol; ``code`` is the reply code and ``fatal`` says the framing is lost.

    ``id`` is the request's id when it could be recovered, so the error reply can still echo it;
    ``has_id`` says whether there is one to echo (an ``"id": null`` the request carried counts).
    """

    def __init__(
        self, msg: str, code: int = Code.BAD_REQUEST, *, id: Any = None, cmdid: Any = None, fatal: bool = False,
        has_id: bool | None = None,
    ) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = int(code)
        self.id = id
        self.has_id = id is not None if has_id is None else has_id
        self.cmdid = cmdid
        self.fatal = fatal


def _handler_code(code: Any) -> int:
    """``code`` if a handler may answer with it; TypeError/ValueError naming the allowed codes."""
    if type(code) is not int and not isinstance(code, Code):
        raise TypeError(f"HandlerError code must be an int, not {type(code).__name__}")
    if code not in HANDLER_CODES:
        allowed = ", ".join(f"{c.name} ({int(c)})" for c in sorted(HANDLER_CODES))
        raise ValueError(f"a handler cannot answer with code {code}: the allowed codes are {allowed}")
    return int(code)


class HandlerError(GeventTCPError):
    """Raise from a handler to answer with ``msg``, an application ``code`` (or 400, the default)
    and optional JSON ``details``, instead of a 500.

    ``code`` must be in :data:`HANDLER_CODES`, else ``ValueError`` (``TypeError`` for a non-int) here,
    when the error is built: a handler cannot forge a transport meaning (see the module docstring).
    ``details`` (any JSON value) is sent in the reply's ``details`` field; without a JSON form the
    reply is a 500.
    """

    def __init__(self, msg: str, code: int = Code.BAD_REQUEST, details: Any = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = _handler_code(code)
        self.details = details


class ServerRefusal(HandlerError):
    """A transport code from one of the server's built-in commands (AUTH's 401) or from a command's
    concurrency limiter (503, ``max_concurrency``); internal.

    Only a built-in (negative cmdid, which applications cannot register) and the limiter, which
    raises it before the handler runs, are answered with its code; raised by an application's
    handler or middleware it is a 500 like any forged code (see :mod:`geventtcp.middleware`).
    """

    def __init__(self, msg: str, code: int) -> None:
        GeventTCPError.__init__(self, msg)
        self.msg = msg
        self.code = int(code)
        self.details = None


class TransportError(GeventTCPError, OSError):
    """The connection failed; the subclass says whether the request may have run."""


class ConnectError(TransportError):
    """The connection could not be opened; nothing was sent."""


class ConnectionClosedError(TransportError):
    """The peer closed the connection."""


class NotSent(TransportError):
    """The request never left this process: sending it again is always safe."""


class Unprocessed(TransportError):
    """The server said it did not process the request (goaway or a retryable code): safe to resend."""


class MaybeExecuted(TransportError):
    """The connection was lost after the request was written: it may or may not have run."""


class CallTimeout(MaybeExecuted, TimeoutError):
    """No reply within the call's timeout; the request may have run (it is a builtin TimeoutError too)."""


class RemoteError(GeventTCPError):
    """The server replied with a nonzero ``code``; ``msg`` is its text, ``details`` the reply's
    ``details`` (None if absent), ``reply`` the whole reply."""

    code: int = 0

    def __init__(self, msg: str, code: int | None = None, reply: dict[str, Any] | None = None,
                 details: Any = None) -> None:
        Exception.__init__(self, msg)  # not super(): an ApplicationError's next base is HandlerError
        self.msg = msg
        if code is not None:
            self.code = int(code)
        self.reply = reply or {}
        self.details = self.reply.get("details") if details is None else details

    @property
    def retryable(self) -> bool:
        """True when the server promises the handler did not run (503 only): any request may be resent."""
        return self.code in RETRYABLE_CODES

    def __str__(self) -> str:
        return f"[{self.code}] {self.msg}"


class BadRequest(RemoteError):
    code = Code.BAD_REQUEST


class Unauthenticated(RemoteError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(RemoteError):
    code = Code.PERMISSION_DENIED


class UnknownCommand(RemoteError):
    code = Code.UNKNOWN_COMMAND


class RequestTimeout(RemoteError):
    code = Code.REQUEST_TIMEOUT


class RequestTooLarge(RemoteError):
    code = Code.TOO_LARGE


class InternalServerError(RemoteError):
    code = Code.INTERNAL


class ServiceUnavailable(RemoteError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(RemoteError):
    code = Code.DEADLINE_EXCEEDED


class ApplicationError(RemoteError, HandlerError):
    """An application code (1000+): the handler ran and answered with this error. Never retried by
    the client (``retryable`` is False); each subclass states when the application may retry.

    Raise it from a handler (``NotFound("no such user", details={"id": 7})``) as a HandlerError;
    the client raises it for the reply, ``.code``, ``.msg`` and ``.details`` as sent. One received
    from a downstream call may be let through a handler unchanged."""

    def __init__(self, msg: str, code: int | None = None, reply: dict[str, Any] | None = None,
                 details: Any = None) -> None:
        RemoteError.__init__(self, msg, code, reply, details)
        if self.code not in APPLICATION_CODES:
            raise ValueError(f"{type(self).__name__} carries an application code, not {self.code}")


class NotFound(ApplicationError):
    """The thing the request names does not exist. Retry: not unchanged."""

    code = Code.NOT_FOUND


class AlreadyExists(ApplicationError):
    """What the request would create exists already. Retry: not unchanged."""

    code = Code.ALREADY_EXISTS


class AccessDenied(ApplicationError):
    """The application knows the caller but does not let it do this (gRPC's PERMISSION_DENIED; 403
    is the server's protected mode). Retry: not with the same credentials."""

    code = Code.ACCESS_DENIED


class NotAuthenticated(ApplicationError):
    """The application's own credentials (an API key in ``meta``, ...) are missing or not valid
    (gRPC's UNAUTHENTICATED; 401 is the server's AUTH). Retry: not without valid ones."""

    code = Code.NOT_AUTHENTICATED


class ResourceExhausted(ApplicationError):
    """A limit or quota of the application is used up. Retry: after a backoff, if idempotent."""

    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(ApplicationError):
    """The system is not in the state the request needs. Retry: not until the state is fixed."""

    code = Code.FAILED_PRECONDITION


class Aborted(ApplicationError):
    """A concurrency conflict. Retry: the whole read-modify-write sequence, at a higher level."""

    code = Code.ABORTED


class DependencyUnavailable(ApplicationError):
    """A dependency of the handler is down; the handler ran (maybe in part). Retry: after a
    backoff, if idempotent (unlike a 503, which promises nothing ran)."""

    code = Code.DEPENDENCY_UNAVAILABLE


#: The one table from wire code to exception class (redis-py's EXCEPTION_CLASSES).
ERROR_CLASSES: dict[int, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthenticated,
        PermissionDenied,
        UnknownCommand,
        RequestTimeout,
        RequestTooLarge,
        InternalServerError,
        ServiceUnavailable,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        AccessDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        DependencyUnavailable,
        NotAuthenticated,
    )
}


def remote_error(reply: dict[str, Any]) -> RemoteError:
    """Build the exception for an error reply; unknown codes give a plain :class:`RemoteError`."""
    code = reply.get("code")
    msg = str(reply.get("msg", ""))
    cls = ERROR_CLASSES.get(code, RemoteError) if isinstance(code, int) else RemoteError
    return cls(msg, code if isinstance(code, int) else -1, reply)
