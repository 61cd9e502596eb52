"""geventtcp: newline-delimited JSON requests between services, served and called on gevent."""

from __future__ import annotations

from . import urls
from .client import Client
from .errors import (
    Code,
    ConfigError,
    GeventTCPError,
    HandlerError,
    ProtocolError,
    RegistryError,
    RemoteError,
)
from .handler import BaseHandler
from .log import BaseLogger
from .protocol import Request
from .server import Server
from .urls import Registry

__version__ = "1.0.0"

__all__ = [
    "__version__",
    "urls",
    "BaseHandler",
    "BaseLogger",
    "Request",
    "Registry",
    "Server",
    "Client",
    "Code",
    "GeventTCPError",
    "ConfigError",
    "RegistryError",
    "ProtocolError",
    "HandlerError",
    "RemoteError",
]
