"""The command registry: maps cmdids to handlers; ``urls.handler(cmdid)`` is the seed's decorator."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from geventtcp.errors import RegistryError
from geventtcp.handler import BaseHandler
from geventtcp.protocol import Request
from geventtcp.schema import ParamsSchema, compile_params

__all__ = ["Registry", "HandlerInfo", "default_registry", "handler", "load_registry", "Handler_mapping"]

T = TypeVar("T")
#: A registered handler reduced to one call: request in, reply data out.
Call = Callable[[Request], Any]


@dataclass(frozen=True)
class HandlerInfo:
    """What ``list`` reports about a registered command."""

    cmdid: int
    name: str
    doc: str
    idempotent: bool
    target: Any
    cancel_on_disconnect: bool = False
    #: The compiled ``params=`` schema (its ``json_schema`` is what ``list`` shows), or None.
    params: ParamsSchema | None = None


def _class_call(cls: type[BaseHandler]) -> Call:
    def call(request: Request) -> Any:
        instance = cls()
        result = instance.process(request)
        return instance.res if result is None else result

    return call


class Registry:
    """A table of commands. Application cmdids are integers >= 0; negative ones are built in.

    Registering a cmdid twice raises :class:`RegistryError` when it happens, which for decorated
    handlers is import time, so a clash stops the server at start-up instead of replacing a handler.
    """

    def __init__(self) -> None:
        self._calls: dict[int, Call] = {}
        self._info: dict[int, HandlerInfo] = {}

    def add(self, cmdid: int, target: Any, *, name: str | None = None, idempotent: bool | None = None,
            cancel_on_disconnect: bool | None = None, params: Any = None) -> None:
        """Register a ``BaseHandler`` subclass or a function ``f(request) -> data`` under ``cmdid``.

        ``cancel_on_disconnect=True`` (default: the class's or function's attribute of that name,
        else False) has :class:`~geventtcp.errors.RequestCancelled` thrown into the handler when
        its client is gone. ``params=`` (a dataclass, TypedDict or pydantic model) validates the
        params before the handler runs and hands it the typed object (:mod:`geventtcp.schema`).
        """
        if not isinstance(cmdid, int) or isinstance(cmdid, bool):
            raise RegistryError(f"cmdid must be an int, not {type(cmdid).__name__}")
        cmdid = int(cmdid)  # an IntEnum member is stored as its plain value
        if cmdid < 0:
            raise RegistryError(f"cmdid {cmdid} is reserved for built-in commands (use >= 0)")
        if cmdid in self._calls:
            raise RegistryError(f"cmdid {cmdid} is already registered to {self._info[cmdid].name}")
        if inspect.isclass(target):
            if not issubclass(target, BaseHandler):
                raise RegistryError(f"{target!r} is not a BaseHandler subclass")
            call = _class_call(target)
            idem = target.idempotent if idempotent is None else idempotent
        elif callable(target):
            call = target
            idem = bool(getattr(target, "idempotent", False)) if idempotent is None else idempotent
        else:
            raise RegistryError(f"{target!r} is neither a handler class nor a callable")
        label = name or f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        if cancel_on_disconnect is None:
            cancel_on_disconnect = bool(getattr(target, "cancel_on_disconnect", False))
        doc = inspect.getdoc(target) or ""
        schema = None if params is None else compile_params(params)
        self._calls[cmdid] = call if schema is None else schema.wrap(call)
        self._info[cmdid] = HandlerInfo(cmdid, label, doc.strip().split("\n\n")[0], idem, target,
                                        cancel_on_disconnect, schema)

    def handler(self, cmdid: int, *, name: str | None = None, idempotent: bool | None = None,
                cancel_on_disconnect: bool | None = None, params: Any = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; returns the class or function unchanged."""

        def decorate(target: T) -> T:
            self.add(cmdid, target, name=name, idempotent=idempotent, cancel_on_disconnect=cancel_on_disconnect,
                     params=params)
            return target

        return decorate

    def get(self, cmdid: int) -> Call | None:
        """The call for ``cmdid``, or ``None``."""
        return self._calls.get(cmdid)

    def info(self, cmdid: int) -> HandlerInfo:
        return self._info[cmdid]

    def clear(self) -> None:
        self._calls.clear()
        self._info.clear()

    @property
    def calls(self) -> dict[int, Call]:
        """The live cmdid-to-call table the server dispatches from (do not mutate)."""
        return self._calls

    def __contains__(self, cmdid: object) -> bool:
        return cmdid in self._calls

    def __iter__(self) -> Iterator[HandlerInfo]:
        return iter(sorted(self._info.values(), key=lambda info: info.cmdid))

    def __len__(self) -> int:
        return len(self._calls)


#: The registry the module-level ``handler`` decorator fills (the seed's ``urls`` module).
default_registry = Registry()
#: ``@urls.handler(cmdid)`` as in SCTornadoTCP.
handler = default_registry.handler
#: The seed's name for the mapping (read-only view of cmdid -> call).
Handler_mapping = default_registry.calls


def load_registry(spec: str) -> Registry:
    """Import the application named by ``spec`` (``module`` or ``module:attr``) and return its registry.

    ``attr`` may name a :class:`Registry` or a zero-argument callable returning one. With only a
    module, its ``registry`` attribute is used when it is a Registry, else the default registry the
    ``urls.handler`` decorator filled while the module was imported. Raises :class:`RegistryError`
    when the module imports but yields no usable registry; import errors propagate.
    """
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, Registry) and callable(obj):
            obj = obj()
        if not isinstance(obj, Registry):
            raise RegistryError(f"{spec} is not a Registry (got {type(obj).__name__})")
        return obj
    candidate = getattr(module, "registry", None)
    if isinstance(candidate, Registry):
        return candidate
    return default_registry
