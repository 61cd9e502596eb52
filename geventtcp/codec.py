"""JSON codecs: strict parsing of untrusted lines and compact, always-valid serialization."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import simplejson

__all__ = ["Codec", "SimplejsonCodec", "get_codec", "CODECS"]

# A "\u" escape of a surrogate half. Only lines that contain one are walked after parsing, so the
# common line pays for a single substring search.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 parses to inf: a number we could never send back as JSON
        raise ValueError(f"number out of range: {text[:32]}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _checked_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _check_strings(value: Any) -> None:
    """Raise ValueError when any string in ``value`` holds a lone surrogate (not encodable as UTF-8)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError is a ValueError
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class Codec:
    """Turns one line into a JSON value and a value into one line; the same rules for every codec.

    ``loads`` raises ``ValueError`` (never anything else) for input that is not strict JSON:
    invalid UTF-8, a BOM, NaN/Infinity or numbers out of range, integers over Python's 4300 digits,
    duplicate keys, lone surrogates, nesting deeper than the interpreter allows, trailing data.
    ``dumps`` raises ``ValueError``/``TypeError`` for values that have no strict JSON form.
    """

    name = "base"

    def loads(self, line: bytes) -> Any:
        raise NotImplementedError

    def dumps(self, value: Any) -> bytes:
        raise NotImplementedError

    @staticmethod
    def _post_check(line: bytes, value: Any) -> Any:
        if _SURROGATE_ESCAPE.search(line) is not None:
            _check_strings(value)
        return value


class SimplejsonCodec(Codec):
    """The default codec: simplejson with its C speedups."""

    name = "simplejson"

    def __init__(self) -> None:
        self._decode: Callable[[str], Any] = simplejson.JSONDecoder(
            object_pairs_hook=_checked_object,
            parse_float=_finite_float,
            parse_constant=_reject_constant,
            allow_nan=False,
        ).decode
        self._encode: Callable[[Any], str] = simplejson.JSONEncoder(
            separators=(",", ":"), allow_nan=False, ensure_ascii=True, check_circular=True
        ).encode

    def loads(self, line: bytes) -> Any:
        try:
            text = line.decode("utf-8")
            if text[:1] == "\ufeff":
                raise ValueError("a byte order mark is not allowed")
            value = self._decode(text)
        except RecursionError:
            raise ValueError("JSON nesting too deep") from None
        return self._post_check(line, value)

    def dumps(self, value: Any) -> bytes:
        try:
            return self._encode(value).encode("ascii")
        except RecursionError:
            raise ValueError("value nested too deep to serialize") from None


CODECS: dict[str, Callable[[], Codec]] = {"simplejson": SimplejsonCodec}


def get_codec(name: str) -> Codec:
    """Return a new codec by name (see :data:`CODECS`); ``ValueError`` for an unknown one."""
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None
    return factory()
