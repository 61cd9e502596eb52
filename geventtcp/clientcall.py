"""One client request in flight: the state its caller and the connection's reader share, and its wire line."""

from __future__ import annotations

from typing import Any

from .codec import Codec
from .errors import NotSent
from .protocol import encode_request

__all__ = ["Call", "DEADLINE_MARGIN", "request_line"]

#: Share of the caller's remaining time kept back from the ``timeout_ms`` sent to the server (at most
#: 50 ms), so that the server's 504 reply arrives before the caller's own deadline.
DEADLINE_MARGIN = 0.05


class Call:
    """One request in flight: the state the reader and the waiting caller share."""

    __slots__ = ("id", "deadline", "sent", "size", "reply", "error", "done", "written", "queued", "signal",
                 "signaled", "abandoned")

    def __init__(self, id: int, deadline: float, abandoned: bool) -> None:
        self.id = id
        self.sent = 0.0
        self.size = 0  # bytes of the request line, newline included
        self.deadline = deadline
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.done = False
        self.written = False
        self.queued = False  # waiting in a BatchingConnection's send queue
        self.signal: Any = None
        self.signaled = False
        self.abandoned = abandoned  # nobody waits: the reply is read and dropped


def request_line(codec: Codec, cmdid: int, params: Any, call: Call, rid: int, now: float, address: str) -> bytes:
    """Number ``call`` as ``rid``, stamp it sent at ``now`` (and its size) and encode its request line, whose
    ``timeout_ms`` is the call's remaining time less :data:`DEADLINE_MARGIN`.

    Raises :class:`NotSent` when the deadline already passed (nothing is numbered then), and
    ``TypeError``/``ValueError`` when ``params`` has no JSON form.
    """
    remaining = call.deadline - now
    if remaining <= 0:
        raise NotSent(f"deadline passed before the request to {address} was written")
    call.id = rid
    call.sent = now
    timeout_ms = int((remaining - min(DEADLINE_MARGIN, remaining * 0.1)) * 1000) or 1
    line = encode_request(codec, cmdid, params, rid, timeout_ms)
    call.size = len(line)
    return line
