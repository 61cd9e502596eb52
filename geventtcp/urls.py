"""The command registry: maps cmdids to handlers; ``urls.handler(cmdid)`` is the seed's decorator."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from geventtcp import middleware as mw
from geventtcp.config import HOOKS, Hook, check_hook
from geventtcp.errors import RegistryError
from geventtcp.handler import BaseHandler, SeedReply
from geventtcp.hooks import APP_HOOKS
from geventtcp.middleware import Call, Middleware
from geventtcp.protocol import Request
from geventtcp.schema import ParamsSchema, compile_params

__all__ = ["Registry", "HandlerInfo", "default_registry", "handler", "hook", "middleware", "before_request",
           "after_request", "teardown_request", "load_registry", "Handler_mapping"]

T = TypeVar("T")
M = TypeVar("M", bound=Callable[..., Any])


@dataclass(frozen=True)
class HandlerInfo:
    """What ``list`` reports about a registered command."""

    cmdid: int
    name: str
    doc: str
    idempotent: bool
    target: Any
    cancel_on_disconnect: bool = False
    #: At most this many of its handlers run at once in a worker; further requests get a 503
    #: (``None``: no limit). See :mod:`geventtcp.middleware`.
    max_concurrency: int | None = None
    #: The compiled ``params=`` schema (its ``json_schema`` is what ``list`` shows), or None.
    params: ParamsSchema | None = None


def _class_call(cls: type[BaseHandler]) -> Call:
    def call(request: Request) -> Any:
        instance = cls()
        result = instance.process(request)
        if result is None:
            result = instance.res
            kind = type(result)  # text that may be the seed's whole reply line: see SeedReply
            if (kind is str and result.lstrip()[:1] == "{") or (kind is bytes and result.lstrip()[:1] == b"{"):
                return SeedReply(result)
        return result

    return call


class Registry:
    """A table of commands. Application cmdids are integers >= 0; negative ones are built in.

    Registering a cmdid twice raises :class:`RegistryError` when it happens, which for decorated
    handlers is import time, so a clash stops the server at start-up instead of replacing a handler.
    """

    def __init__(self) -> None:
        self._calls: dict[int, Call] = {}
        self._info: dict[int, HandlerInfo] = {}
        self._hooks: dict[str, list[Hook]] = {}
        self._middlewares: list[Middleware] = []
        self._flask: mw.FlaskHooks | None = None  # created (and put in the chain) by the first Flask hook
        self._limits: dict[int, int] = {}
        self._places: dict[int, list[None]] = {}

    def add(self, cmdid: int, target: Any, *, name: str | None = None, idempotent: bool | None = None,
            cancel_on_disconnect: bool | None = None, max_concurrency: int | None = None,
            params: Any = None) -> None:
        """Register a ``BaseHandler`` subclass or a function ``f(request) -> data`` under ``cmdid``.

        ``cancel_on_disconnect=True`` (default: the class's or function's attribute of that name,
        else False) has :class:`~geventtcp.errors.RequestCancelled` thrown into the handler when
        its client is gone. ``max_concurrency=k`` answers a retryable 503 before the handler runs
        once ``k`` of its handlers are running in the worker (size it to a database pool).
        ``params=`` (a dataclass, TypedDict or pydantic model) validates the params before the
        handler runs and hands it the typed object (:mod:`geventtcp.schema`).
        """
        if not isinstance(cmdid, int) or isinstance(cmdid, bool):
            raise RegistryError(f"cmdid must be an int, not {type(cmdid).__name__}")
        cmdid = int(cmdid)  # an IntEnum member is stored as its plain value
        if cmdid < 0:
            raise RegistryError(f"cmdid {cmdid} is reserved for built-in commands (use >= 0)")
        if cmdid in self._calls:
            raise RegistryError(f"cmdid {cmdid} is already registered to {self._info[cmdid].name}")
        if max_concurrency is not None and (type(max_concurrency) is not int or max_concurrency < 1):
            raise RegistryError(f"max_concurrency must be an int >= 1, not {max_concurrency!r}")
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
                                        cancel_on_disconnect, max_concurrency, schema)
        if max_concurrency is not None:
            self._limits[cmdid] = max_concurrency
            self._places[cmdid] = [None] * max_concurrency

    def handler(self, cmdid: int, *, name: str | None = None, idempotent: bool | None = None,
                cancel_on_disconnect: bool | None = None, max_concurrency: int | None = None,
                params: Any = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; returns the class or function unchanged."""

        def decorate(target: T) -> T:
            self.add(cmdid, target, name=name, idempotent=idempotent, cancel_on_disconnect=cancel_on_disconnect,
                     max_concurrency=max_concurrency, params=params)
            return target

        return decorate

    def hook(self, name: str) -> Callable[[T], T]:
        """Decorator: register a worker lifecycle hook of the application (``post_worker_init``,
        ``worker_int``, ``worker_abort``, ``worker_exit``; see :mod:`geventtcp.hooks`), run after the
        config file's hook of that name. A wrong name or signature raises :class:`RegistryError` at
        import time, so the worker fails to boot instead of never running it."""
        if name not in APP_HOOKS:
            why = ("it runs in the master or before the application is imported: set it in the Python config file"
                   if name in HOOKS else "no such hook")
            raise RegistryError(f"{name!r} is not an application hook (one of {', '.join(APP_HOOKS)}): {why}")

        def decorate(target: T) -> T:
            problem = check_hook(name, target)
            if problem is not None:
                raise RegistryError(problem)
            self._hooks.setdefault(name, []).append(cast(Hook, target))
            return target

        return decorate

    def hooks(self, name: str) -> list[Hook]:
        """The application's hooks registered under ``name``, in registration order."""
        return list(self._hooks.get(name, ()))

    # -- middleware (composed by geventtcp.middleware.build_calls when a server starts) ------------

    def middleware(self, fn: M) -> M:
        """Run ``fn(request, call_next) -> data`` around every handler of this registry, inside the
        server-level middleware and those registered before it; usable as a decorator."""
        self._middlewares.append(fn)
        return fn

    def before_request(self, fn: M) -> M:
        """Flask's ``before_request``: ``fn(request)`` before the handler, in registration order; a
        result other than ``None`` is the answer (see :class:`~geventtcp.middleware.FlaskHooks`)."""
        self._flask_hooks().add_before(fn)
        return fn

    def after_request(self, fn: M) -> M:
        """Flask's ``after_request``: ``fn(request, data) -> data`` once the handler returned, in
        reverse registration order."""
        self._flask_hooks().add_after(fn)
        return fn

    def teardown_request(self, fn: M) -> M:
        """Flask's ``teardown_request``: ``fn(request, exc_or_None)`` last, always, in reverse
        registration order; it cannot change the reply."""
        self._flask_hooks().add_teardown(fn)
        return fn

    def _flask_hooks(self) -> mw.FlaskHooks:
        if self._flask is None:
            self._flask = mw.FlaskHooks()
            self._middlewares.append(self._flask.middleware())
        return self._flask

    @property
    def middlewares(self) -> Sequence[Middleware]:
        """This registry's middleware, outermost first (registration order)."""
        return tuple(self._middlewares)

    @property
    def limits(self) -> Mapping[int, int]:
        """``max_concurrency`` per cmdid, for the commands that have one."""
        return self._limits

    def places(self, cmdid: int) -> list[None]:
        """The free places of ``cmdid``'s concurrency limit (one token each; see
        :func:`geventtcp.middleware.limit_concurrency`): one list per registry, shared by every server
        built from it, so the limit holds per process however many servers serve this registry."""
        return self._places[cmdid]

    def get(self, cmdid: int) -> Call | None:
        """The call for ``cmdid``, or ``None``."""
        return self._calls.get(cmdid)

    def info(self, cmdid: int) -> HandlerInfo:
        return self._info[cmdid]

    def clear(self) -> None:
        self._calls.clear()
        self._info.clear()
        self._hooks.clear()
        self._middlewares.clear()
        self._flask = None
        self._limits.clear()
        self._places.clear()

    @property
    def calls(self) -> dict[int, Call]:
        """The registered calls by cmdid (do not mutate); a server dispatches from these wrapped in their
        middleware and limits (:func:`geventtcp.middleware.build_calls`), or these themselves when none."""
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
#: ``@urls.hook("worker_exit")``: a lifecycle hook of the application (see :meth:`Registry.hook`).
hook = default_registry.hook
#: ``@urls.middleware`` and Flask's hooks, on the default registry.
middleware = default_registry.middleware
before_request = default_registry.before_request
after_request = default_registry.after_request
teardown_request = default_registry.teardown_request
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
