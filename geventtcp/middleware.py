"""Middleware and per-command concurrency limits, composed once into the cmdid -> call table.

A middleware is ``fn(request, call_next) -> data``: it runs around an application handler (a
``BaseHandler`` class or a plain function), calls ``call_next(request)`` to go on (or does not, and
answers early: returns data, or raises :class:`~geventtcp.errors.HandlerError` or an application
error class), and sees the handler's result or exception. Its ``try``/``finally`` always runs: on
success, on an error, at the 504 deadline (the server throws ``DeadlineReached``, a BaseException,
into the handler's greenlet) and when the client is gone (``RequestCancelled`` for a handler
registered with ``cancel_on_disconnect``; otherwise the handler, and so its middleware, runs to its
end). Order: the server-level list first (outermost, the ``middleware`` setting or
``Server(middleware=[...])``), then the registry's in registration order
(:meth:`geventtcp.urls.Registry.middleware`). Flask's ``before_request``/``after_request``/
``teardown_request`` functions of a registry run as in Flask, in one middleware (:class:`FlaskHooks`)
placed where the registry's first such function was registered.

Composition happens once, in :func:`build_calls`, when a server builds its table (``Server.start``;
a testing kit calls the same function): each cmdid's call becomes ``m1(request, lambda r:
m2(r, ... handler(r)))`` made of one small closure per middleware. With no middleware and no limit
the table holds exactly the registry's callables, so the request path costs what it cost before.

Built-in commands (PING, LIST, STATS, AUTH) are never wrapped: they are the transport's, not the
application's. A health check must answer even when the application's middleware would refuse it
(say, one that requires a tenant, or opens a database session), and AUTH runs before the
connection may call anything else.

A command registered with ``max_concurrency=k`` gets a limiter outside all middleware: once ``k``
of its handlers run in this process (the worker), a further request is refused with
:class:`~geventtcp.errors.ServerRefusal` code 503 (``Code.UNAVAILABLE``, the one code the client
reads as "not processed, safe to retry") before any middleware or the handler runs. The count is
released in a ``finally``, so every way out of the handler (return, error, deadline, cancel, a kill)
gives its place back; a handler that swallows the deadline keeps its place until it really ends.
The places are the registry's (:meth:`~geventtcp.urls.Registry.places`), shared by every server
built from it: ``k`` is sized to a resource of the process (a database pool), and a process that
serves one registry from two Servers (two ports, a test's servers, TestClients in their own
threads) still runs at most ``k``. They are a list of ``k`` tokens taken with ``pop`` and given back
with ``append``, each one step under the GIL, so servers in different threads share them safely.
The server answers a ServerRefusal with 503 only for commands that have a limit and only when the
limiter raised it: one escaping the handler or a middleware inside the limiter becomes a 500, so no
application code can produce a "not processed" reply.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from geventtcp.errors import Code, ConfigError, ServerRefusal
from geventtcp.protocol import Request

__all__ = ["Middleware", "Call", "Commands", "build_calls", "load_middleware", "FlaskHooks",
           "limit_concurrency"]

log = logging.getLogger("geventtcp.middleware")

#: A registered handler reduced to one call: request in, reply data out.
Call = Callable[[Request], Any]
#: ``fn(request, call_next) -> data``.
Middleware = Callable[[Request, Call], Any]


class Commands(Protocol):
    """What :func:`build_calls` reads of a :class:`~geventtcp.urls.Registry` (which imports this module)."""

    @property
    def calls(self) -> Mapping[int, Call]: ...

    @property
    def middlewares(self) -> Sequence[Middleware]: ...

    @property
    def limits(self) -> Mapping[int, int]: ...

    def places(self, cmdid: int) -> list[None]: ...


def build_calls(registry: Commands, middleware: Sequence[Middleware] = ()) -> dict[int, Call]:
    """The application's cmdid -> call table: each handler wrapped in ``middleware`` (the server-level
    list, outermost) then the registry's own, and in its concurrency limiter if it has one.

    Without middleware and limits: a copy of ``registry.calls``, the very callables registered.
    """
    chain = [*middleware, *registry.middlewares]
    limits = registry.limits
    calls: dict[int, Call] = {}
    for cmdid, call in registry.calls.items():
        for mw in reversed(chain):
            call = _link(mw, call)
        limit = limits.get(cmdid)
        if limit is not None:
            call = limit_concurrency(call, cmdid, limit, registry.places(cmdid))
        calls[cmdid] = call
    return calls


def _link(mw: Middleware, call_next: Call) -> Call:
    """One layer: the only per-request cost of a middleware besides its own body is this call."""

    def call(request: Request) -> Any:
        return mw(request, call_next)

    return call


def limit_concurrency(call: Call, cmdid: int, limit: int, places: list[None] | None = None) -> Call:
    """``call`` refusing (503, see the module docstring) while ``limit`` of its calls are running;
    ``places`` (the registry's, shared by its servers) holds the free ones, ``limit`` new ones by default."""
    free: list[None] = [None] * limit if places is None else places
    take = free.pop
    give = free.append

    def limited(request: Request) -> Any:
        try:
            take()
        except IndexError:
            raise ServerRefusal(f"cmdid {cmdid}: {limit} requests already running (max_concurrency)",
                                Code.UNAVAILABLE) from None
        try:
            return call(request)
        except ServerRefusal as exc:  # from the handler or a middleware: not ours, so the handler ran
            raise RuntimeError(f"cmdid {cmdid}: a handler or middleware raised ServerRefusal") from exc
        finally:
            give(None)

    return limited


# -- Flask's hooks, as one middleware ----------------------------------------------------------------

class FlaskHooks:
    """Flask's ``before_request``/``after_request``/``teardown_request`` functions of one registry, run
    as Flask runs them, by one middleware (the registry adds it where its first hook is registered).

    ``before`` functions ``fn(request)`` run in registration order; the first result other than
    ``None`` is the answer and the handler does not run. ``after`` functions ``fn(request, data) ->
    data`` run in reverse registration order on that answer or the handler's result (not when
    something raised); what they return is sent. ``teardown`` functions ``fn(request, exc)`` run
    last, in reverse registration order, always: ``exc`` is what was raised (a HandlerError, the
    deadline's or a cancel's BaseException, ...) or ``None``; their results are ignored and an
    exception one raises is logged, never sent (a teardown cannot change the reply).
    """

    __slots__ = ("before", "after", "teardown")

    def __init__(self) -> None:
        self.before: list[Callable[[Request], Any]] = []
        #: Newest first (the order they run in), so a request walks the lists without ``reversed``.
        self.after: list[Callable[[Request, Any], Any]] = []
        self.teardown: list[Callable[[Request, BaseException | None], Any]] = []

    def add_before(self, fn: Callable[[Request], Any]) -> None:
        self.before.append(fn)

    def add_after(self, fn: Callable[[Request, Any], Any]) -> None:
        self.after.insert(0, fn)

    def add_teardown(self, fn: Callable[[Request, BaseException | None], Any]) -> None:
        self.teardown.insert(0, fn)

    def middleware(self) -> Middleware:
        """The middleware that runs the hooks: a closure over the three lists (cheaper to call than
        an instance's ``__call__``), which it reads on each request."""
        befores, afters, teardowns = self.before, self.after, self.teardown

        def flask_hooks(request: Request, call_next: Call) -> Any:
            answer = None
            try:
                for before in befores:
                    answer = before(request)
                    if answer is not None:
                        break
                if answer is None:
                    answer = call_next(request)
                for after in afters:
                    answer = after(request, answer)
            except BaseException as exc:
                if teardowns:
                    _tear_down(teardowns, request, exc)
                raise
            if teardowns:
                _tear_down(teardowns, request, None)
            return answer

        return flask_hooks


def _tear_down(teardowns: list[Callable[[Request, BaseException | None], Any]], request: Request,
               exc: BaseException | None) -> None:
    """Run every teardown function, even when one is interrupted: the deadline's ``DeadlineReached``,
    a cancel or a kill can land in one that waits (a BaseException), and the ones after it (the
    oldest, often the one that releases a database session) must still run; the first such
    interruption is raised again once all have run."""
    interrupted: BaseException | None = None
    for fn in teardowns:
        try:
            fn(request, exc)
        except Exception:
            log.exception("teardown_request function %r raised (cmdid %r); the reply is unchanged", fn, request.cmdid)
        except BaseException as stop:  # noqa: BLE001 - re-raised below, after the other teardowns
            if interrupted is None:
                interrupted = stop
    if interrupted is not None:
        raise interrupted


# -- the server-level list ------------------------------------------------------------------------------

def load_middleware(items: Iterable[Any]) -> list[Middleware]:
    """The ``middleware`` setting's entries as callables: each is a callable already, or a
    ``"module:attr"`` name imported here (in the worker). Raises :class:`ConfigError` naming a bad entry."""
    loaded: list[Middleware] = []
    for item in items:
        if callable(item):
            loaded.append(item)
            continue
        module_name, _, attr = str(item).partition(":")
        if not module_name or not attr:
            raise ConfigError(f"middleware {item!r}: expected 'module:attr'")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"middleware {item!r}: {exc}") from exc
        if not callable(obj):
            raise ConfigError(f"middleware {item!r} is not callable")
        loaded.append(obj)
    return loaded
