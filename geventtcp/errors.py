"""Status codes of the wire protocol and the one exception hierarchy, mapped to each other in one table."""

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
    "ERROR_CLASSES",
    "remote_error",
]


class Code(enum.IntEnum):
    """Every ``code`` a reply can carry; HTTP-like numbers, 0 for success.

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
    #: Draining, shutting down, or over a connection/in-flight limit; the handler did not run,
    #: so retrying is safe.
    UNAVAILABLE = 503
    #: The handler did not finish before the request's deadline (it may have had side effects).
    DEADLINE_EXCEEDED = 504


#: Codes that promise the handler did not run, so any request may be sent again (gRPC A6's rule).
RETRYABLE_CODES = frozenset({Code.UNAVAILABLE})


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


class HandlerError(GeventTCPError):
    """Raise from a handler to send a chosen error ``code`` and ``msg`` instead of a 500."""

    def __init__(self, msg: str, code: int = Code.BAD_REQUEST) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = int(code)


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
    """The server replied with a nonzero ``code``; ``msg`` is its text, ``reply`` the whole reply."""

    code: int = 0

    def __init__(self, msg: str, code: int | None = None, reply: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        if code is not None:
            self.code = int(code)
        self.reply = reply or {}

    @property
    def retryable(self) -> bool:
        """True when the server promises the handler did not run."""
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
    )
}


def remote_error(reply: dict[str, Any]) -> RemoteError:
    """Build the exception for an error reply; unknown codes give a plain :class:`RemoteError`."""
    code = reply.get("code")
    msg = str(reply.get("msg", ""))
    cls = ERROR_CLASSES.get(code, RemoteError) if isinstance(code, int) else RemoteError
    return cls(msg, code if isinstance(code, int) else -1, reply)
