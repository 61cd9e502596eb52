"""Reply decoding for the client: the fast path for lines a geventtcp server wrote."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .codec import Codec

__all__ = ["ReplyCodec"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class ReplyCodec(Codec):
    """Requests are encoded by the client's codec; replies, which come from a geventtcp server and
    are pure ASCII JSON, are parsed by the stdlib's C decoder: strict UTF-8, no NaN/Infinity,
    integers exact, but without the per-object duplicate-key hook the server needs against hostile
    input (a third of a small call's cost). Anything unreadable is a ``ValueError``, which
    :func:`geventtcp.protocol.decode_reply` turns into a ProtocolError."""

    def __init__(self, codec: Codec) -> None:
        self.name = codec.name
        self.dumps = codec.dumps  # type: ignore[method-assign]
        self._raw_decode: Callable[[str], tuple[Any, int]] = json.JSONDecoder(
            parse_constant=_reject_constant).raw_decode

    def loads(self, line: bytes) -> Any:
        try:
            text = line.decode("utf-8")
            value, end = self._raw_decode(text)
        except RecursionError:
            raise ValueError("JSON nesting too deep") from None
        if end != len(text) and not text[end:].isspace():
            raise ValueError(f"extra data after the JSON value at {end}")
        return value
