"""Typed params: ``urls.handler(cmdid, params=Schema)`` validates a request's params before the handler runs.

A schema is a dataclass, a ``TypedDict`` (both with no dependency: validated by this module) or a
pydantic v2 model (validated by pydantic, when it is installed). :func:`compile_params` turns it,
once, at registration, into a :class:`ParamsSchema`: a tree of small checkers built from the type
hints (no introspection per request) plus the command's JSON Schema for the ``list`` built-in.

What a request gets
    ``ParamsSchema.wrap(call)`` is the registered call: it replaces ``request.params`` by the
    validated object (the dataclass instance, a new dict holding only the TypedDict's keys, or the
    pydantic model instance) and then calls the handler, which never sees params that failed. The
    raw JSON object is not kept: ``request.raw`` is the line as received.

How it fails
    Invalid params raise :class:`~geventtcp.errors.HandlerError` 400 (a ``BadRequest`` at the client)
    whose ``details`` lists every bad field as ``{"path": "items[2].qty", "reason": "..."}`` (up to
    :data:`MAX_DETAILS`, where validation stops; ``msg`` names the first). An annotation this module cannot check
    raises :class:`~geventtcp.errors.RegistryError` naming the field, at registration (import time).

Rules (dataclass and TypedDict)
    * ``int`` refuses ``bool`` (JSON's ``true`` is not 1) and floats; ``float`` accepts an integer
      and stores it as a float; ``str``, ``bool`` and ``None`` take exactly their JSON type.
    * ``X | None``/``Optional``/``Union`` (first member that accepts the value), ``list[T]``,
      ``tuple[T, ...]``/``tuple[A, B]`` (from a JSON array), ``dict[str, T]``, ``Literal[...]``,
      ``Enum`` subclasses (by value, giving the member), ``Any``, ``Annotated[T, ...]`` (as ``T``),
      nested dataclasses and TypedDicts (recursive ones too).
    * A field missing from the params takes its default (dataclass) or stays absent (TypedDict
      ``total=False``/``NotRequired``); without one it is reported ``field required``. A missing
      ``params`` object is ``{}`` (the protocol's default), so only a schema whose fields all have
      defaults accepts it.
    * Unknown fields are ignored, as protobuf, gRPC and pydantic's default do, so a newer client can
      send a field an older server does not know yet.
    * A ``ValueError`` raised by a dataclass's ``__init__``/``__post_init__`` (a cross-field rule) is
      reported as that object's error, with its message as the reason.

A pydantic model follows its own configuration (lax by default: pydantic turns ``"3"`` and ``true``
into 3 for an ``int``; use ``StrictInt`` or ``ConfigDict(strict=True)`` to refuse them).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, NotRequired, Required, Union, get_args, get_origin, is_typeddict

from geventtcp.errors import Code, HandlerError, RegistryError

__all__ = ["ParamsSchema", "compile_params", "MAX_DETAILS"]

#: At most this many bad fields are listed in a 400's ``details``, and validation stops at that
#: many (a 1 MiB line of ``true`` in a ``list[int]`` would otherwise cost a second and answer
#: with megabytes).
MAX_DETAILS = 100

#: A field's place while validating: ``None`` (the params object) or ``(parent, name or index)``,
#: built only on the way down and rendered to text only for an error.
Path = tuple[Any, str | int] | None
Errors = list[tuple[Path, str]]
Check = Callable[[Any, Errors, Path], Any]

_INVALID: Any = object()  # what a checker returns after recording an error


class _Enough(Exception):
    """Raised by :class:`_Errors` at :data:`MAX_DETAILS`: validation stops there, so a line of a
    million bad items costs what parsing it cost, not a second of formatting reasons."""


class _Errors(list[tuple[Path, str]]):
    """The errors of one validation, at most MAX_DETAILS (then :class:`_Enough` ends it)."""

    def append(self, error: tuple[Path, str]) -> None:
        super().append(error)
        if len(self) >= MAX_DETAILS:
            raise _Enough
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
               list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def render_path(path: Path) -> str:
    """``(((None, "items"), 2), "qty")`` -> ``"items[2].qty"``; the params object itself is ``""``."""
    parts: list[str] = []
    while path is not None:
        path, segment = path
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
        else:  # a dict[str, T] key is the client's text: bounded, as the reply must be
            parts.append(f".{segment}" if len(segment) <= 64 else f".{segment[:61]}...")
    return "".join(reversed(parts)).lstrip(".")


class _Node:
    """One compiled annotation: values whose type is in ``exact`` pass unchanged without a call (the
    fast path for scalars); any other value goes through ``check``, which returns the converted value
    or records an error and returns ``_INVALID``. ``schema`` is its JSON Schema fragment."""

    __slots__ = ("exact", "check", "schema")

    def __init__(self, exact: frozenset[type], check: Check, schema: dict[str, Any]) -> None:
        self.exact = exact
        self.check = check
        self.schema = schema

    def run(self, value: Any, errors: Errors, path: Path) -> Any:
        return value if type(value) in self.exact else self.check(value, errors, path)


def _refuse(expected: str) -> Check:
    def check(value: Any, errors: Errors, path: Path) -> Any:
        errors.append((path, f"expected {expected}, got {_json_type(value)}"))
        return _INVALID

    return check


def _check_float(value: Any, errors: Errors, path: Path) -> Any:
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:  # JSON integers may have up to 4300 digits; a float holds ~308
            errors.append((path, "number out of range for a float"))
            return _INVALID
    errors.append((path, f"expected a number, got {_json_type(value)}"))
    return _INVALID


def _pass(value: Any, errors: Errors, path: Path) -> Any:
    return value


_SCALARS: dict[Any, _Node] = {
    int: _Node(frozenset({int}), _refuse("an integer"), {"type": "integer"}),
    float: _Node(frozenset({float}), _check_float, {"type": "number"}),
    str: _Node(frozenset({str}), _refuse("a string"), {"type": "string"}),
    bool: _Node(frozenset({bool}), _refuse("a boolean"), {"type": "boolean"}),
    type(None): _Node(frozenset({type(None)}), _refuse("null"), {"type": "null"}),
    Any: _Node(frozenset(), _pass, {}),
}
_SCALARS[None] = _SCALARS[type(None)]


class _Compiler:
    """Builds the checker tree and the JSON Schema of one params class; ``defs`` collects the nested
    classes' schemas (``$defs``), ``objects`` the node of every class already seen (recursion)."""

    def __init__(self) -> None:
        self.defs: dict[str, dict[str, Any]] = {}
        self.objects: dict[type, _Node] = {}
        self.names: dict[type, str] = {}

    def node(self, annotation: Any, where: str) -> _Node:
        scalar = _SCALARS.get(annotation) if _hashable(annotation) else None
        if scalar is not None:
            return scalar
        origin = get_origin(annotation)
        args = get_args(annotation)
        if origin is typing.Annotated:
            return self.node(args[0], where)
        if origin is Union or origin is types.UnionType:
            return self._union([self.node(arg, where) for arg in args], annotation)
        if origin is Literal:
            return _literal(args)
        if annotation is list or origin is list:
            return self._array(self.node(args[0] if args else Any, where), list)
        if origin is tuple and (len(args) == 2 and args[1] is Ellipsis):
            return self._array(self.node(args[0], where), tuple)
        if origin is tuple and args and Ellipsis not in args:
            return self._fixed_tuple([self.node(arg, where) for arg in args])
        if annotation is dict or origin is dict:
            if args and args[0] is not str:
                raise RegistryError(f"{where}: JSON object keys are strings; use dict[str, ...], not {annotation!r}")
            return self._mapping(self.node(args[1] if args else Any, where))
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            return self._enum(annotation)
        if isinstance(annotation, type) and (dataclasses.is_dataclass(annotation) or is_typeddict(annotation)):
            return self.object(annotation)
        raise RegistryError(
            f"{where}: unsupported annotation {annotation!r} (supported: int, float, str, bool, None, "
            "Optional/Union, list, tuple, dict[str, T], Literal, Enum, Any, dataclasses and TypedDicts)")

    def object(self, cls: type, root: bool = False) -> _Node:
        """The node of a dataclass or TypedDict: a ``$ref`` to its schema in ``defs`` (``#`` for the
        root class, whose schema is the document itself)."""
        seen = self.objects.get(cls)
        if seen is not None:
            return seen
        node = _Node(frozenset(), _pass, {"$ref": "#" if root else f"#/$defs/{self.def_name(cls)}"})
        self.objects[cls] = node  # before the fields: a recursive field finds it
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception as exc:  # NameError, TypeError: a hint that cannot be resolved
            raise RegistryError(f"params {cls.__qualname__}: cannot resolve its annotations ({exc}); a params "
                                "class and the classes it names must be importable from its module") from exc
        build = None if is_typeddict(cls) else cls
        fields = self._typeddict_fields(cls, hints) if is_typeddict(cls) else self._dataclass_fields(cls, hints)
        node.check = _object_check(fields, build)
        self.defs[self.def_name(cls)] = _object_schema(cls, fields)
        return node

    def def_name(self, cls: type) -> str:
        """``cls``'s key in ``$defs``: its name, made unique when two classes share one."""
        name = self.names.get(cls)
        if name is None:
            taken = set(self.names.values())
            name = cls.__name__
            while name in taken:
                name += "_"
            self.names[cls] = name
        return name

    def _field(self, cls: type, name: str, annotation: Any) -> _Node:
        return self.node(annotation, f"params {cls.__qualname__}.{name}")

    def _dataclass_fields(self, cls: type, hints: dict[str, Any]) -> list[_Field]:
        fields = []
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            default = field.default if field.default is not dataclasses.MISSING else _INVALID
            fields.append(_Field(field.name, self._field(cls, field.name, hints[field.name]), not has_default,
                                 default))
        return fields

    def _typeddict_fields(self, cls: type, hints: dict[str, Any]) -> list[_Field]:
        required_keys: frozenset[str] = getattr(cls, "__required_keys__", frozenset())
        fields = []
        for name, annotation in hints.items():
            required = name in required_keys
            # Required/NotRequired are read here too: with postponed annotations (PEP 563) Python
            # 3.11's TypedDict cannot see them in __required_keys__.
            while get_origin(annotation) in (Required, NotRequired, typing.Annotated):
                if get_origin(annotation) is not typing.Annotated:
                    required = get_origin(annotation) is Required
                annotation = get_args(annotation)[0]
            fields.append(_Field(name, self._field(cls, name, annotation), required, _INVALID))
        return fields

    def _union(self, members: list[_Node], annotation: Any) -> _Node:
        exact = frozenset().union(*(member.exact for member in members))
        real = [member for member in members if member.exact != _SCALARS[None].exact]
        expected = " or ".join(_describe(member.schema) for member in members)

        def check(value: Any, errors: Errors, path: Path) -> Any:
            if len(real) == 1 and value is not None:  # Optional[X]: X's own errors, paths and all
                return real[0].check(value, errors, path)
            for member in real:
                scratch = _Errors()
                try:
                    result = member.run(value, scratch, path)
                except _Enough:
                    continue
                if not scratch:
                    return result
            errors.append((path, f"expected {expected}, got {_json_type(value)}"))
            return _INVALID

        return _Node(exact, check, {"anyOf": [member.schema for member in members]})

    def _array(self, item: _Node, kind: type) -> _Node:
        exact = item.exact  # item.check is read per call: a recursive class's is set after this

        def check(value: Any, errors: Errors, path: Path) -> Any:
            if type(value) is not list:
                errors.append((path, f"expected an array, got {_json_type(value)}"))
                return _INVALID
            if exact and set(map(type, value)) <= exact:  # all scalars of the right type: a C-speed pass
                return value if kind is list else tuple(value)
            out = [v if type(v) in exact else item.check(v, errors, (path, i)) for i, v in enumerate(value)]
            return out if kind is list else tuple(out)

        return _Node(frozenset(), check, {"type": "array", "items": item.schema})

    def _fixed_tuple(self, items: list[_Node]) -> _Node:
        def check(value: Any, errors: Errors, path: Path) -> Any:
            if type(value) is not list or len(value) != len(items):
                errors.append((path, f"expected an array of {len(items)} items, got {_json_type(value)}"
                               + (f" of {len(value)}" if type(value) is list else "")))
                return _INVALID
            return tuple(node.run(v, errors, (path, i)) for i, (node, v) in enumerate(zip(items, value, strict=True)))

        return _Node(frozenset(), check, {"type": "array", "prefixItems": [node.schema for node in items],
                                          "minItems": len(items), "maxItems": len(items)})

    def _mapping(self, item: _Node) -> _Node:
        exact = item.exact

        def check(value: Any, errors: Errors, path: Path) -> Any:
            if type(value) is not dict:
                errors.append((path, f"expected an object, got {_json_type(value)}"))
                return _INVALID
            if exact and set(map(type, value.values())) <= exact:
                return value
            return {k: v if type(v) in exact else item.check(v, errors, (path, k)) for k, v in value.items()}

        return _Node(frozenset(), check, {"type": "object", "additionalProperties": item.schema})

    def _enum(self, cls: type[enum.Enum]) -> _Node:
        members = {(type(m.value), m.value): m for m in cls}
        self.defs[self.def_name(cls)] = {"title": cls.__name__, "enum": [m.value for m in cls]}
        expected = "one of " + ", ".join(json.dumps(m.value) for m in cls)

        def check(value: Any, errors: Errors, path: Path) -> Any:
            member = members.get((type(value), value)) if _hashable(value) else None
            if member is None:
                errors.append((path, f"expected {expected}, got {_short(value)}"))
                return _INVALID
            return member

        return _Node(frozenset(), check, {"$ref": f"#/$defs/{self.def_name(cls)}"})


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    node: _Node
    required: bool
    default: Any  # _INVALID: none to show in the JSON Schema


def _object_check(fields: list[_Field], build: Callable[..., Any] | None) -> Check:
    """The checker of a dataclass (``build`` is the class) or a TypedDict (``build`` is None: the
    checked dict is the result)."""
    table = [(f.name, f.node.exact, f.node, f.required) for f in fields]  # exact is fixed: read it once

    def check(value: Any, errors: Errors, path: Path) -> Any:
        if type(value) is not dict:
            errors.append((path, f"expected an object, got {_json_type(value)}"))
            return _INVALID
        before = len(errors)
        out = {}
        for name, exact, node, required in table:
            if name in value:
                v = value[name]
                out[name] = v if type(v) in exact else node.check(v, errors, (path, name))
            elif required:
                errors.append(((path, name), "field required"))
        if len(errors) > before:
            return _INVALID
        if build is None:
            return out
        try:
            return build(**out)
        except ValueError as exc:  # a dataclass's __post_init__ refusing a combination of fields
            errors.append((path, str(exc) or type(exc).__name__))
            return _INVALID

    return check


def _literal(values: tuple[Any, ...]) -> _Node:
    allowed = {(type(v), v) for v in values}
    expected = "one of " + ", ".join(json.dumps(v) for v in values)
    for v in values:
        if type(v) not in _JSON_TYPES or type(v) in (list, dict):
            raise RegistryError(f"Literal values must be JSON scalars, not {v!r}")

    def check(value: Any, errors: Errors, path: Path) -> Any:
        if _hashable(value) and (type(value), value) in allowed:
            return value
        errors.append((path, f"expected {expected}, got {_short(value)}"))
        return _INVALID

    schema = {"const": values[0]} if len(values) == 1 else {"enum": list(values)}
    return _Node(frozenset(), check, schema)


def _object_schema(cls: type, fields: list[_Field]) -> dict[str, Any]:
    properties = {}
    for field in fields:
        prop = dict(field.node.schema)
        if field.default is not _INVALID:
            default = field.default.value if isinstance(field.default, enum.Enum) else field.default
            if _jsonable(default):
                prop["default"] = default
        properties[field.name] = prop
    schema: dict[str, Any] = {"type": "object", "title": cls.__name__, "properties": properties}
    required = [field.name for field in fields if field.required]
    if required:
        schema["required"] = required
    doc = cls.__doc__
    if doc and not doc.startswith(f"{cls.__name__}("):  # not the signature dataclasses writes
        schema["description"] = doc.strip().split("\n\n")[0]
    return schema


def _describe(schema: dict[str, Any]) -> str:
    if "type" in schema:
        return str(schema["type"])
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    return "a value"


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _short(value: Any) -> str:
    """A bad scalar for a reason (``"pending"``), truncated; the JSON type of anything else."""
    if type(value) in (str, int, float, bool) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return _json_type(value)


def _invalid(errors: Errors, stopped: bool = False) -> HandlerError:
    """The 400 for ``errors``; ``stopped``: validation gave up at MAX_DETAILS, there may be more."""
    details = [{"path": render_path(path), "reason": reason} for path, reason in errors[:MAX_DETAILS]]
    first = details[0]
    where = f"{first['path']}: " if first["path"] else ""
    if stopped or len(errors) > MAX_DETAILS:
        more = f" (and more: the first {MAX_DETAILS} are listed)"
    else:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return HandlerError(f"invalid params: {where}{first['reason']}{more}", Code.BAD_REQUEST, details=details)


class ParamsSchema:
    """A params class compiled for one command: ``validate`` a params dict, ``wrap`` a handler's call,
    ``json_schema`` for ``list``. Built by :func:`compile_params`; immutable after."""

    __slots__ = ("cls", "kind", "json_schema", "validate")

    def __init__(self, cls: type, kind: str, json_schema: dict[str, Any], validate: Callable[[Any], Any]) -> None:
        self.cls = cls
        #: "dataclass", "typeddict" or "pydantic".
        self.kind = kind
        #: The params' JSON Schema (draft 2020-12), as ``list`` reports it.
        self.json_schema = json_schema
        #: ``validate(params) -> the typed object``; raises HandlerError 400 with ``details``.
        self.validate = validate

    def wrap(self, call: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``call`` preceded by validation: ``request.params`` becomes the typed object."""
        validate = self.validate

        def validated(request: Any) -> Any:
            request.params = validate(request.params)
            return call(request)

        return validated

    def __repr__(self) -> str:
        return f"<ParamsSchema {self.kind} {self.cls.__qualname__}>"


def compile_params(cls: Any) -> ParamsSchema:
    """Compile ``cls`` (a dataclass, a TypedDict or a pydantic v2 model) once, for ``params=``.

    Raises :class:`RegistryError` for anything else, or for a field whose annotation is unsupported.
    """
    if _is_pydantic_model(cls):
        return _compile_pydantic(cls)
    if not (isinstance(cls, type) and (dataclasses.is_dataclass(cls) or is_typeddict(cls))):
        raise RegistryError(f"params= takes a dataclass, a TypedDict or a pydantic model, not {cls!r}")
    compiler = _Compiler()
    root = compiler.object(cls, root=True)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **compiler.defs.pop(compiler.def_name(cls))}
    if compiler.defs:
        schema["$defs"] = compiler.defs
    check = root.check

    def validate(params: Any) -> Any:
        errors = _Errors()
        try:
            result = check(params, errors, None)
        except _Enough:
            raise _invalid(errors, stopped=True) from None
        if errors:
            raise _invalid(errors)
        return result

    return ParamsSchema(cls, "typeddict" if is_typeddict(cls) else "dataclass", schema, validate)


def _is_pydantic_model(cls: Any) -> bool:
    """Without importing pydantic unless ``cls`` comes from it (it is an optional dependency)."""
    if not isinstance(cls, type) or "pydantic" not in sys.modules:
        return False
    from pydantic import BaseModel

    return issubclass(cls, BaseModel)


def _compile_pydantic(model: Any) -> ParamsSchema:
    from pydantic import ValidationError

    model_validate = model.model_validate

    def validate(params: Any) -> Any:
        try:
            return model_validate(params)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            raise _invalid([(_pydantic_path(err["loc"]), err["msg"]) for err in errors[:MAX_DETAILS]],
                           stopped=len(errors) > MAX_DETAILS) from None

    return ParamsSchema(model, "pydantic", model.model_json_schema(), validate)


def _pydantic_path(loc: tuple[int | str, ...]) -> Path:
    path: Path = None
    for segment in loc:
        path = (path, segment)
    return path
