"""OpenTelemetry over real sockets: client -> server A -> (its handler calls) server B is one trace with the
right parent links; span attributes and status per reply code; the trace context on the wire; when tracing
is off (or has no provider) nothing is wrapped; ``on`` without opentelemetry-api is a ConfigError."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from geventtcp import Registry, Server
from geventtcp.client.client import Client
from geventtcp.errors import Code, ConfigError, HandlerError, InternalServerError, NotFound
from geventtcp.tracing import tracer_for
from tests.support.rawconn import RawConn
from tests.support.servers import addr
from tests.support.system import run_python, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A provider of its own (the global one is left unset: other tests must see tracing ``auto`` off)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def spans_named(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = exporter.get_finished_spans()
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def test_client_a_b_is_one_trace_with_parent_links(serve: Callable[..., Server], provider: TracerProvider,
                                                   exporter: InMemorySpanExporter) -> None:
    b = Registry()
    b.add(2, lambda request: {"b_meta": dict(request.meta)}, name="b.lookup")
    server_b = serve(b, tracer_provider=provider)
    a = Registry()

    def front(request: Any) -> Any:
        with Client(addr(server_b), timeout=5, tracer_provider=provider, meta={"request_id": "r-1"}) as downstream:
            return downstream.call(2, {"q": 1})

    a.add(1, front, name="a.front")
    server_a = serve(a, tracer_provider=provider)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("test.root") as root, \
            Client(addr(server_a), timeout=5, tracer_provider=provider) as client:
        result = client.call(1, meta={"request_id": "r-1"})
    spans = spans_named(exporter)
    assert set(spans) == {"test.root", "geventtcp/1", "a.front", "geventtcp/2", "b.lookup"}
    client_span, a_span, a_client, b_span = (spans[name] for name in ("geventtcp/1", "a.front", "geventtcp/2",
                                                                       "b.lookup"))
    assert {span.context.trace_id for span in spans.values()} == {root.get_span_context().trace_id}
    # client span -> A server span -> A's client span -> B server span
    assert client_span.parent is not None and client_span.parent.span_id == root.get_span_context().span_id
    assert a_span.parent is not None and a_span.parent.span_id == client_span.context.span_id
    assert a_span.parent.is_remote
    assert a_client.parent is not None and a_client.parent.span_id == a_span.context.span_id
    assert b_span.parent is not None and b_span.parent.span_id == a_client.context.span_id
    assert [span.kind for span in (client_span, a_span, a_client, b_span)] == [
        SpanKind.CLIENT, SpanKind.SERVER, SpanKind.CLIENT, SpanKind.SERVER]
    # What travelled to B: the client's meta plus the trace context of A's client span.
    traceparent = result["b_meta"]["traceparent"]
    assert traceparent.startswith(f"00-{a_client.context.trace_id:032x}-{a_client.context.span_id:016x}-")
    assert result["b_meta"]["request_id"] == "r-1"
    a_attributes = dict(a_span.attributes or {})
    assert type(a_attributes.pop("network.peer.port")) is int
    assert a_attributes == {
        "rpc.system": "geventtcp", "rpc.method": "a.front", "geventtcp.cmdid": 1, "geventtcp.code": 0,
        "network.peer.address": "127.0.0.1", "geventtcp.request_id": "r-1"}
    assert dict(client_span.attributes or {}) == {"rpc.system": "geventtcp", "geventtcp.cmdid": 1,
                                                  "geventtcp.code": 0}
    assert all(span.status.status_code == StatusCode.UNSET for span in spans.values())


def test_the_server_span_continues_a_traceparent_sent_on_the_wire(serve: Callable[..., Server],
                                                                  provider: TracerProvider,
                                                                  exporter: InMemorySpanExporter) -> None:
    registry = Registry()
    registry.add(1, lambda request: trace.get_current_span().get_span_context().trace_id, name="echo_trace")
    server = serve(registry, tracer_provider=provider)
    with RawConn(server.address[:2]) as conn:
        reply = conn.call(1, id=1, meta={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        unparented = conn.call(1, id=2)
        garbled = conn.call(1, id=3, meta={"traceparent": "00-nonsense"})
    assert reply["data"] == int(TRACE_ID, 16)  # the handler runs inside its span
    first, second, third = exporter.get_finished_spans()
    assert (first.context.trace_id, first.parent and first.parent.span_id) == (int(TRACE_ID, 16), int(PARENT_ID, 16))
    assert second.parent is None and unparented["data"] == second.context.trace_id  # a new trace
    assert third.parent is None and garbled["code"] == 0  # an invalid traceparent is ignored, never a failure


def test_span_code_and_status_follow_the_reply(serve: Callable[..., Server], provider: TracerProvider,
                                               exporter: InMemorySpanExporter) -> None:
    registry = Registry()

    def missing(request: Any) -> Any:
        raise HandlerError("no such order", Code.NOT_FOUND)

    def broken(request: Any) -> Any:
        raise RuntimeError("boom")

    def slow(request: Any) -> Any:
        gevent.sleep(5)

    registry.add(1, missing, name="missing")
    registry.add(2, broken, name="broken")
    registry.add(3, slow, name="slow")
    server = serve(registry, tracer_provider=provider)
    with Client(addr(server), timeout=5, tracer_provider=provider, retries=0) as client:
        with pytest.raises(NotFound):
            client.call(1)
        with pytest.raises(InternalServerError):
            client.call(2)
        with RawConn(server.address[:2]) as conn:
            assert conn.call(3, id=9, timeout_ms=50)["code"] == 504
    wait_until(lambda: len(exporter.get_finished_spans()) == 5)
    spans = spans_named(exporter)
    codes = {name: (span.attributes or {}).get("geventtcp.code") for name, span in spans.items()}
    assert codes == {"geventtcp/1": 1005, "missing": 1005, "geventtcp/2": 500, "broken": 500, "slow": 504}
    status = {name: span.status.status_code for name, span in spans.items()}
    # A server's own fault (500, 504) is an error of its span; an application code is the handler's answer.
    assert status == {"missing": StatusCode.UNSET, "broken": StatusCode.ERROR, "slow": StatusCode.ERROR,
                      "geventtcp/1": StatusCode.ERROR, "geventtcp/2": StatusCode.ERROR}
    assert [event.name for event in spans["broken"].events] == ["exception"]
    assert spans["broken"].events[0].attributes["exception.message"] == "boom"  # type: ignore[index]


def test_call_async_and_send_carry_the_callers_context(serve: Callable[..., Server], provider: TracerProvider,
                                                       exporter: InMemorySpanExporter) -> None:
    registry = Registry()
    seen: list[str] = []
    registry.add(1, lambda request: seen.append(request.meta["traceparent"]), name="note")
    server = serve(registry, tracer_provider=provider)
    tracer = provider.get_tracer("test")
    with Client(addr(server), timeout=5, tracer_provider=provider) as client, \
            tracer.start_as_current_span("caller") as caller:
        client.call_async(1).result(5)
        client.send(1)
        wait_until(lambda: len(seen) == 2)
    spans = exporter.get_finished_spans()
    caller_id = caller.get_span_context().span_id
    async_client = next(span for span in spans if span.name == "geventtcp/1")
    assert async_client.parent is not None and async_client.parent.span_id == caller_id
    assert seen[0].split("-")[2] == f"{async_client.context.span_id:016x}"
    assert seen[1].split("-")[2] == f"{caller_id:016x}"  # send makes no span: the caller's is the parent
    note_parents = sorted(span.parent.span_id for span in spans if span.name == "note" and span.parent)
    assert note_parents == sorted([async_client.context.span_id, caller_id])


def test_off_or_without_a_provider_nothing_is_wrapped(serve: Callable[..., Server], provider: TracerProvider,
                                                      exporter: InMemorySpanExporter) -> None:
    registry = Registry()
    registry.add(1, lambda request: dict(request.meta), name="meta")
    handler = registry.calls[1]
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # no global provider here
    for server in (serve(registry), serve(registry, tracing="off", tracer_provider=provider)):
        assert server.calls[1] is handler  # the table holds the handler itself, as without tracing
        with Client(addr(server), timeout=5) as auto, \
                Client(addr(server), timeout=5, tracing="off", tracer_provider=provider) as off:
            assert auto._tracing is None and off._tracing is None
            assert auto.call(1) == {} and off.call(1) == {}  # no traceparent sent
    assert serve(registry, tracer_provider=provider).calls[1] is not handler
    assert exporter.get_finished_spans() == ()


def test_on_without_opentelemetry_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if opentelemetry-api were not installed
    with pytest.raises(ConfigError, match=r"geventtcp\[otel\]"):
        tracer_for("on")
    assert tracer_for("auto") is None
    with pytest.raises(ConfigError, match=r"geventtcp\[otel\]"):
        Client("127.0.0.1:1", tracing="on")
    with pytest.raises(ConfigError, match="tracing must be one of"):
        tracer_for("yes")


AUTO = """
import json
from gevent import monkey
monkey.patch_all()
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from geventtcp import Client, Registry, Server

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
registry = Registry()
registry.add(1, lambda request: "traceparent" in request.meta, name="auto.handler")
with Server(registry, bind="127.0.0.1:0") as server, Client("%s:%d" % server.address[:2], timeout=5) as client:
    assert client.call(1) is True
print(json.dumps(sorted((span.name, span.kind.name) for span in exporter.get_finished_spans())))
"""


@pytest.mark.subprocess
def test_auto_traces_once_a_global_provider_is_set() -> None:
    out = run_python(AUTO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [["auto.handler", "SERVER"], ["geventtcp/1", "CLIENT"]]
