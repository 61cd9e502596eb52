"""JSON codecs: strict parsing of untrusted lines and compact, always-valid serialization."""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import simplejson
import simplejson.encoder

__all__ = ["Codec", "SimplejsonCodec", "OrjsonCodec", "get_codec", "CODECS"]

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


def _tuple_or_asdict(value: Any) -> Any:
    """The encoder's ``default``: what simplejson's ``namedtuple_as_object``/``tuple_as_array`` do.

    simplejson probes every container for an ``_asdict`` method before encoding it (a failed
    attribute lookup, ~0.5 us per dict or list); with both options off in the C encoder, only
    tuples and unknown types reach this function, which applies the same rules.
    """
    asdict = getattr(value, "_asdict", None)
    if asdict is not None and callable(asdict):
        return asdict()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


def _check_strings(value: Any) -> bool:
    """Raise ValueError when any string in ``value`` holds a lone surrogate (one not paired, as JSON's
    ``\\u`` escapes pair them: a parsed value never holds a pair, a handler's result may).

    False when ``value`` holds something else than JSON's types and tuples (an ``_asdict`` object,
    a Decimal): strings the encoder found there were not checked.
    """
    complete = True
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")  # UnicodeEncodeError is a ValueError
            except UnicodeEncodeError as exc:  # a high and a low surrogate side by side are one character in JSON
                try:
                    item.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
                except UnicodeDecodeError:
                    raise exc from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif item is not None and not isinstance(item, (int, float)):
            complete = False
    return complete


class _SampleRow(NamedTuple):
    x: int
    y: list[int]


_SAMPLE_ROW = _SampleRow(1, [2])


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

    def check_surrogates(self, line: bytes, value: Any) -> None:
        """``ValueError`` when ``line``, the JSON this codec made of ``value``, escapes a lone
        surrogate: the encoders write one as ``\\udXXX`` without complaint, and a strict reader (the
        client's reply codec) refuses the line. Only a line holding a surrogate escape is checked:
        by walking ``value``'s strings (a 1.5 MiB string of emoji: ~0.3 ms), or, when ``value``
        holds objects the walk cannot see into, by parsing ``line`` again."""
        if _SURROGATE_ESCAPE.search(line) is not None and not _check_strings(value):
            self.loads(line)

    @staticmethod
    def _post_check(line: bytes, value: Any) -> Any:
        if _SURROGATE_ESCAPE.search(line) is not None:
            _check_strings(value)
        return value


class SimplejsonCodec(Codec):
    """The default codec: simplejson with its C speedups.

    simplejson's ``JSONDecoder.decode`` and ``JSONEncoder.encode`` are thin Python layers that,
    per call, re-check their input and (for encoding) build a new C encoder from twenty settings.
    Here both C objects are built once and called directly; anything off the common path (a line
    not starting with ``{``, trailing data, any error) goes through the full simplejson call, so
    results and error messages are exactly simplejson's.
    """

    name = "simplejson"

    def __init__(self) -> None:
        decoder = simplejson.JSONDecoder(
            object_pairs_hook=_checked_object,
            parse_float=_finite_float,
            parse_constant=_reject_constant,
            allow_nan=False,
        )
        self._decode: Callable[[str], Any] = decoder.decode
        self._scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once
        encoder = simplejson.JSONEncoder(
            separators=(",", ":"), allow_nan=False, ensure_ascii=True, check_circular=True
        )
        self._encode: Callable[[Any], str] = encoder.encode
        self._markers: dict[int, Any] = {}
        self._key_memo: dict[Any, str] = {}
        self._c_encode = self._make_c_encoder(encoder)

    def _make_c_encoder(self, enc: Any) -> Callable[[Any, int], list[str]] | None:
        """The C encoder ``JSONEncoder.iterencode`` would build, built once (None: not available).

        The arguments mirror simplejson's own ``iterencode``, except that tuples and ``_asdict``
        objects are handled by :func:`_tuple_or_asdict` (same output; the one difference: a dict or
        list *subclass* with an ``_asdict`` method is encoded as the dict or list it is). A
        self-check against ``encode`` on a sample guards against a simplejson version that changed
        the arguments (then ``encode`` is used).
        """
        make = getattr(simplejson.encoder, "c_make_encoder", None)
        if make is None:
            return None
        try:
            c_encode: Callable[[Any, int], list[str]] = make(
                self._markers, _tuple_or_asdict, simplejson.encoder.encode_basestring_ascii, enc.indent,
                enc.key_separator, enc.item_separator, enc.sort_keys, enc.skipkeys, enc.allow_nan,
                self._key_memo, enc.use_decimal, False, False,
                53 if enc.bigint_as_string else enc.int_as_string_bitcount, enc.item_sort_key,
                enc.encoding, enc.for_json, enc.ignore_nan, decimal.Decimal, enc.iterable_as_array)
            sample = {"a": [1, 2.5, None, True, "\u00e9\n", {"b": 10**30}], "c": (1, (2,)), "d": _SAMPLE_ROW}
            if "".join(c_encode(sample, 0)) != enc.encode(sample):
                return None
        except Exception:
            return None
        finally:
            self._key_memo.clear()
        return c_encode

    def loads(self, line: bytes) -> Any:
        try:
            text = line.decode("utf-8")
            if text[:1] == "{":  # no BOM, no leading whitespace: decode() would scan from 0 too
                try:
                    value, end = self._scan(text, 0)
                except Exception:
                    value, end = None, -1
                if end != len(text):  # trailing whitespace, trailing data or an error: the full path
                    value = self._decode(text)
            else:
                if text[:1] == "\ufeff":
                    raise ValueError("a byte order mark is not allowed")
                value = self._decode(text)
        except RecursionError:
            raise ValueError("JSON nesting too deep") from None
        if 92 in line:  # a backslash (an int: memchr; ``b"\\" in`` first tries the bytes as an index)
            return self._post_check(line, value)
        return value

    def dumps(self, value: Any) -> bytes:
        c_encode = self._c_encode
        try:
            if c_encode is None:
                return self._encode(value).encode("ascii")
            try:
                return "".join(c_encode(value, 0)).encode("ascii")
            except BaseException:
                self._markers.clear()  # an error can leave the containers it was inside marked
                raise
            finally:
                if len(self._key_memo) > 4096:  # a cache of encoded keys: bound it
                    self._key_memo.clear()
        except RecursionError:
            raise ValueError("value nested too deep to serialize") from None


#: Lines longer than this are checked for deep nesting before orjson may parse them: orjson's
#: nesting limit (1024) is above the interpreter's recursion limit that bounds simplejson.
_ORJSON_CHECK_DEPTH_BYTES = 1000
_ORJSON_MAX_BRACKETS = 200


class OrjsonCodec(Codec):
    """orjson (the ``[fast]`` extra) wherever it gives exactly the default codec's result, simplejson elsewhere.

    orjson alone would differ from the strict codec: it keeps the last of duplicate keys, reads
    integers beyond 64 bits as floats, nests deeper, writes NaN as null and serializes Enum, UUID,
    dataclass and datetime values. So:

    * ``loads`` keeps orjson's value only when the line is exactly orjson's own compact encoding of
      it (one ``dumps`` and a byte comparison). Then no pair was dropped, no number changed type,
      there is no BOM, escape of a surrogate or stray whitespace, and simplejson would read the
      same value; long lines are also checked for depth. Any other line (say, with spaces after
      the colons) and every orjson error goes to :class:`SimplejsonCodec`, so results and error
      messages are the default codec's.
    * ``dumps`` uses orjson only for values made of exact built-in types (``marshal`` refuses
      every subclass, Enum, UUID, Decimal, dataclass, datetime and namedtuple), and not when a
      float could have become ``null``; orjson's own refusals (big integers, non-string keys, lone
      surrogates, cycles) fall back too. The text may differ from simplejson's (UTF-8 instead of
      ``\\u`` escapes); the JSON value is the same.
    """

    name = "orjson"

    def __init__(self) -> None:
        try:
            import orjson
        except ImportError:
            raise ValueError("the orjson codec needs orjson: pip install 'geventtcp[fast]'") from None
        import marshal

        self._loads: Callable[[bytes], Any] = orjson.loads
        self._dumps: Callable[[Any], bytes] = orjson.dumps
        self._core_types_only: Callable[[Any], bytes] = marshal.dumps
        self.exact = SimplejsonCodec()

    def loads(self, line: bytes) -> Any:
        try:
            value = self._loads(line)
            if self._dumps(value) == line and (
                    len(line) < _ORJSON_CHECK_DEPTH_BYTES
                    or line.count(b"[") + line.count(b"{") <= _ORJSON_MAX_BRACKETS):
                return value
        except (ValueError, TypeError):
            pass
        return self.exact.loads(line)

    def dumps(self, value: Any) -> bytes:
        try:
            # marshal serializes exact built-in types only: a ValueError names anything else.
            marshalled = self._core_types_only(value)
            result: bytes = self._dumps(value)
        except (ValueError, TypeError):
            return self.exact.dumps(value)
        # A NaN or infinity comes out as null: with a float in the value ('g', marshal's float
        # code, or 'g' | FLAG_REF) and a null in the text, let the exact codec decide.
        if (103 in marshalled or 231 in marshalled) and result.find(b"null") >= 0:
            return self.exact.dumps(value)
        return result


CODECS: dict[str, Callable[[], Codec]] = {"simplejson": SimplejsonCodec, "orjson": OrjsonCodec}


def get_codec(name: str) -> Codec:
    """Return a new codec by name (see :data:`CODECS`); ``ValueError`` for an unknown one."""
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None
    return factory()
