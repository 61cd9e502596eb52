"""OpenTelemetry tracing (optional: ``pip install geventtcp[otel]``): a SERVER span per handler, a CLIENT
span per call, and the trace context carried in the request's ``meta`` between them.

What it owns: deciding whether tracing is on (:func:`tracer_for`), the server's span middleware
(:func:`server_middleware`, a ``fn(request, call_next)`` the server puts around every application
handler), and the client's traced call (:class:`ClientTracing`). Nothing else in geventtcp imports
OpenTelemetry: with tracing off nothing here is imported past this module, the server's call table
holds the handlers themselves and a client call takes its usual path, so tracing off (or
``opentelemetry-api`` absent) costs a request nothing (``tests/test_call_budget.py``).

When it is on (the ``tracing`` setting, the ``Client(tracing=...)`` argument):

``off``
    Never.
``auto`` (default)
    When ``opentelemetry-api`` is importable and a tracer provider has been set
    (``trace.set_tracer_provider``, or the ``opentelemetry-instrument`` wrapper) by the time the server
    starts or the client is created; or a ``tracer_provider`` is given. Without a provider the API
    only makes spans that record nothing, so ``auto`` does not pay for them.
``on``
    Always; a :class:`~geventtcp.errors.ConfigError` when ``opentelemetry-api`` is missing.

Propagation goes through OpenTelemetry's global propagator (W3C ``traceparent``/``tracestate`` and
``baggage`` by default), with ``meta`` as the carrier: the client injects the span of the call, the
server extracts it from ``request.meta`` and makes the handler's span its child (a request without
trace context starts a new trace). The handler's span is the current span while it runs, so a
handler that calls another geventtcp service (or anything instrumented) continues the trace.

Span names and attributes (OpenTelemetry's RPC conventions, ``geventtcp.*`` for the rest):
the server span is named after the handler (its registered name), kind SERVER, with
``rpc.system="geventtcp"``, ``rpc.method`` (the handler's name), ``geventtcp.cmdid``,
``geventtcp.code`` (the reply code as the handler produced it: 0, its HandlerError's code, 500, or
504 at the deadline), ``network.peer.address``/``network.peer.port`` and ``geventtcp.request_id``
when ``meta`` has one; its status is ERROR for a 500 or 504 (a fault of the server, as gRPC's
server spans count them), with the exception recorded for a 500. The client span is named
``geventtcp/<cmdid>``, kind CLIENT, with ``rpc.system``, ``geventtcp.cmdid`` and ``geventtcp.code``
(0, or the error reply's code); any exception makes it ERROR.

Failure behaviour: a ``meta`` the propagator cannot fill within the protocol's rules (a huge
``baggage``) makes the call raise ``ValueError`` before anything is sent, as a bad ``meta`` does.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from geventtcp.errors import HANDLER_CODES, Code, ConfigError, HandlerError, RemoteError
from geventtcp.protocol import encode_meta

if TYPE_CHECKING:
    from geventtcp.protocol import Request
    from geventtcp.urls import Registry

__all__ = ["TRACING_MODES", "tracer_for", "server_middleware", "ClientTracing", "client_tracing"]

#: The values of the ``tracing`` setting.
TRACING_MODES = ("auto", "on", "off")
#: The instrumentation scope the spans are reported under.
SCOPE = "geventtcp"


def tracer_for(mode: str, tracer_provider: Any = None) -> Any | None:
    """The OpenTelemetry tracer to make spans with under ``mode`` (see the module docstring), or
    ``None`` when tracing is off; :class:`ConfigError` for ``on`` without ``opentelemetry-api`` or
    an unknown mode."""
    if mode not in TRACING_MODES:
        raise ConfigError(f"tracing must be one of {', '.join(TRACING_MODES)}, not {mode!r}")
    if mode == "off":
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        if mode == "on":
            raise ConfigError("tracing = on needs opentelemetry-api (pip install geventtcp[otel])") from None
        return None
    if tracer_provider is None:
        tracer_provider = trace.get_tracer_provider()
        if mode == "auto" and isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None  # nothing set: the API's spans would record nothing
    return tracer_provider.get_tracer(SCOPE)


# -- server -----------------------------------------------------------------------------------------


def server_middleware(tracer: Any, registry: Registry) -> Callable[..., Any]:
    """The middleware ``fn(request, call_next)`` that runs each handler of ``registry`` in a SERVER
    span made by ``tracer``, the child of the trace context in ``request.meta``."""
    from opentelemetry import propagate
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind, StatusCode

    extract = propagate.extract
    start = tracer.start_as_current_span
    server = SpanKind.SERVER
    error = StatusCode.ERROR
    empty = Context()  # not the current context: a request without trace context starts a trace
    names: dict[int, tuple[str, dict[str, Any]]] = {}

    def describe(cmdid: int) -> tuple[str, dict[str, Any]]:
        name = registry.info(cmdid).name if cmdid in registry else f"geventtcp/{cmdid}"
        names[cmdid] = found = (name, {"rpc.system": "geventtcp", "rpc.method": name, "geventtcp.cmdid": cmdid})
        return found

    def trace_handler(request: Request, call_next: Callable[[Request], Any]) -> Any:
        cmdid = request.cmdid
        name, attributes = names.get(cmdid) or describe(cmdid)
        meta = request.meta
        parent = extract(meta, context=empty) if meta else empty
        with start(name, context=parent, kind=server, attributes=attributes, record_exception=False,
                   set_status_on_exception=False) as span:
            _peer(span, request.address)
            request_id = meta.get("request_id")
            if request_id is not None:
                span.set_attribute("geventtcp.request_id", request_id)
            try:
                data = call_next(request)
            except HandlerError as exc:  # the handler's answer: the client's error, not the server's
                code = exc.code if exc.code in HANDLER_CODES else Code.INTERNAL
                span.set_attribute("geventtcp.code", int(code))
                if code == Code.INTERNAL:
                    span.set_status(error, "internal error")
                raise
            except Exception as exc:  # a 500
                span.set_attribute("geventtcp.code", int(Code.INTERNAL))
                span.record_exception(exc)
                span.set_status(error, f"{type(exc).__name__}: {exc}")
                raise
            except BaseException as exc:  # the deadline (504), a cancel or a kill: not the handler's fault
                reply_code = getattr(exc, "code", None)
                if reply_code is not None:
                    span.set_attribute("geventtcp.code", int(reply_code))
                span.set_status(error, type(exc).__name__)
                raise
            span.set_attribute("geventtcp.code", 0)
            return data

    return trace_handler


def _peer(span: Any, address: Any) -> None:
    if isinstance(address, tuple) and len(address) >= 2:
        span.set_attribute("network.peer.address", str(address[0]))
        span.set_attribute("network.peer.port", int(address[1]))
    elif address:
        span.set_attribute("network.peer.address", str(address))


# -- client -----------------------------------------------------------------------------------------


def client_tracing(mode: str, tracer_provider: Any = None) -> ClientTracing | None:
    """A client's :class:`ClientTracing` under ``mode``, or ``None`` when tracing is off."""
    tracer = tracer_for(mode, tracer_provider)
    return None if tracer is None else ClientTracing(tracer)


class ClientTracing:
    """A client's traced calls: a CLIENT span around each call, its context injected into ``meta``."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        self.tracer = tracer
        self._inject = propagate.inject
        self._kind = SpanKind.CLIENT

    def call(self, client: Any, cmdid: int, params: Any, timeout: float | None, idempotent: bool | None,
             meta: Mapping[str, str] | None, deadline: float | None) -> Any:
        """``client.call(...)`` in a CLIENT span whose context travels in the request's ``meta``."""
        attributes = {"rpc.system": "geventtcp", "geventtcp.cmdid": cmdid}
        with self.tracer.start_as_current_span(f"geventtcp/{cmdid}", kind=self._kind, attributes=attributes) as span:
            meta_line = self.meta_line(client, meta)
            try:
                data = client.call(cmdid, params, timeout, idempotent, _deadline=deadline, _meta_line=meta_line)
            except RemoteError as exc:
                span.set_attribute("geventtcp.code", exc.code)
                raise
            span.set_attribute("geventtcp.code", 0)
            return data

    def meta_line(self, client: Any, meta: Mapping[str, str] | None) -> bytes:
        """The request's ``meta`` field: the client's, the call's and the current trace context."""
        carrier: dict[str, str] = dict(client.meta)
        if meta:
            carrier.update(meta)
        self._inject(carrier)
        return encode_meta(client.codec, carrier) if carrier else b""

    def send_meta(self, client: Any, meta: Mapping[str, str] | None) -> bytes:
        """The ``meta`` field of a fire-and-forget ``send``: the current trace context, no span of its own."""
        return self.meta_line(client, meta)

    @staticmethod
    def bind(fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` to run in a copy of the current context (a ``call_async`` runs in another thread or
        greenlet, which would not see the caller's current span)."""
        return functools.partial(contextvars.copy_context().run, fn)
