"""geventtcp: newline-delimited JSON requests between services, served and called on gevent."""

from __future__ import annotations

from geventtcp import urls
from geventtcp.client.client import Client
from geventtcp.errors import (
    Aborted,
    AccessDenied,
    AlreadyExists,
    ApplicationError,
    BadRequest,
    CallTimeout,
    Code,
    ConfigError,
    ConnectError,
    DeadlineExceeded,
    DependencyUnavailable,
    FailedPrecondition,
    GeventTCPError,
    HandlerError,
    InternalServerError,
    MaybeExecuted,
    NotAuthenticated,
    NotFound,
    NotSent,
    PermissionDenied,
    ProtocolError,
    RegistryError,
    RemoteError,
    RequestCancelled,
    RequestTimeout,
    RequestTooLarge,
    ResourceExhausted,
    ServiceUnavailable,
    TransportError,
    Unauthenticated,
    UnknownCommand,
    Unprocessed,
)
from geventtcp.handler import BaseHandler
from geventtcp.identity import Identity
from geventtcp.log import BaseLogger
from geventtcp.protocol import Request
from geventtcp.server.server import Server
from geventtcp.urls import Registry

__version__ = "1.0.0"

__all__ = [
    "__version__",
    "urls",
    "BaseHandler",
    "BaseLogger",
    "Request",
    "Identity",
    "Registry",
    "Server",
    "Client",
    "Code",
    "GeventTCPError",
    "ConfigError",
    "RegistryError",
    "ProtocolError",
    "HandlerError",
    "RequestCancelled",
    "RemoteError",
    # What a Client caller catches: transport failures (did the request run?) ...
    "TransportError",
    "ConnectError",
    "NotSent",
    "Unprocessed",
    "MaybeExecuted",
    "CallTimeout",
    # ... and the server's nonzero reply codes (errors.ERROR_CLASSES).
    "BadRequest",
    "Unauthenticated",
    "PermissionDenied",
    "UnknownCommand",
    "RequestTimeout",
    "RequestTooLarge",
    "InternalServerError",
    "ServiceUnavailable",
    "DeadlineExceeded",
    # ... and the application codes a handler answers with (raise them, or HandlerError).
    "ApplicationError",
    "NotFound",
    "AlreadyExists",
    "AccessDenied",
    "NotAuthenticated",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "DependencyUnavailable",
]
