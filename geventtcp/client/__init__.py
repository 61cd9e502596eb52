"""The client side: :class:`Client` (``client``) over pools (``pool``) of multiplexed connections
(``connection``, ``batch``), each request's shared state (``call``), deadline-bounded socket I/O per
concurrency world (``io``, ``concurrency``) and the reply decoder (``replycodec``).

Imports the foundation only, never :mod:`geventtcp.server`.
"""

from geventtcp.client.client import Client
from geventtcp.errors import (
    CallTimeout,
    ConnectError,
    MaybeExecuted,
    NotSent,
    RemoteError,
    TransportError,
    Unprocessed,
)

__all__ = ["Client", "RemoteError", "TransportError", "NotSent", "Unprocessed", "MaybeExecuted", "CallTimeout",
           "ConnectError"]
