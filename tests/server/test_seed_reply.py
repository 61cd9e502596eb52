"""Seed replies: an SCTornadoTCP handler that puts its whole reply line in ``self.res`` is answered with
that object (not double-encoded as ``data``), the request's id echoed, and never with a code a client
reads as a transport meaning. The module below is written as a seed handler module, with only its
imports changed, and is called by a seed-style raw client and by geventtcp's Client."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from geventtcp import BaseHandler, Client, Registry, Server
from geventtcp.codec import get_codec
from geventtcp.errors import InternalServerError, NotFound
from geventtcp.protocol import Request
from geventtcp.server.connection import encode_seed_reply
from tests.support.rawconn import RawConn
from tests.support.servers import CliServer, addr
from tests.support.system import python_cmd

#: A seed handler module; only the import lines differ from SCTornadoTCP's (``from tornadoTCP...``).
SEED_APP = textwrap.dedent('''
    # -*- coding: utf-8 -*-
    import json

    from geventtcp import urls, BaseHandler, Request


    class Constant(object):
        USER_CMDID = 10001
        ORDER_CMDID = 10002
        LEGACY_ERROR_CMDID = 10003
        TEXT_CMDID = 10004


    @urls.handler(Constant.USER_CMDID)
    class UserHandler(BaseHandler):
        def process(self, request):
            if isinstance(request, Request):
                user = {"name": request.params.get("name"), "level": 3}
                self.res = json.dumps({"code": 0, "cmdid": Constant.USER_CMDID, "data": user}) + "\\n"
            else:
                raise TypeError


    @urls.handler(Constant.ORDER_CMDID)
    class OrderHandler(BaseHandler):
        def process(self, request):
            order_id = request.params.get("order_id")
            if order_id != 7:
                # An application code (1005: not found) and the seed's own extra field.
                reply = {"code": 1005, "cmdid": Constant.ORDER_CMDID, "msg": "no order %s" % order_id,
                         "order_id": order_id}
                self.res = json.dumps(reply).encode("utf-8") + b"\\n"  # bytes, as some seed handlers wrote
                return
            # Pretty-printed: newlines inside the reply.
            self.res = json.dumps({"code": 0, "cmdid": Constant.ORDER_CMDID, "data": {"order_id": 7},
                                   "total": 1}, indent=2) + "\\n"


    @urls.handler(Constant.LEGACY_ERROR_CMDID)
    class LegacyErrorHandler(BaseHandler):
        def process(self, request):
            self.res = json.dumps({"code": 503, "cmdid": Constant.LEGACY_ERROR_CMDID, "msg": "busy"}) + "\\n"


    @urls.handler(Constant.TEXT_CMDID)
    class TextHandler(BaseHandler):
        def process(self, request):
            self.res = "plain text, not a reply line"
''')


@pytest.fixture(scope="module")
def seed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    app_dir = tmp_path_factory.mktemp("seedapp")
    (app_dir / "seedapp.py").write_text(SEED_APP)
    srv = CliServer(python_cmd("-m", "geventtcp", "serve", "seedapp", "--bind", "127.0.0.1:0"), cwd=app_dir)
    yield srv
    srv.stop()


def _seed_call(conn: RawConn, cmdid: int, params: dict[str, Any]) -> dict[str, Any]:
    """As the seed's clients did: a request line without id, one line back, its fields read by name."""
    conn.send(json.dumps({"cmdid": cmdid, "timestamp": 1700000000, "params": params}).encode() + b"\n")
    return conn.line()


@pytest.mark.subprocess
def test_a_seed_client_reads_the_handlers_own_reply(seed_server: CliServer) -> None:
    with RawConn((seed_server.host, seed_server.port)) as conn:
        assert _seed_call(conn, 10001, {"name": "ann"}) == {
            "code": 0, "cmdid": 10001, "data": {"name": "ann", "level": 3}}  # not "data": "{\"code\": 0, ..."
        assert _seed_call(conn, 10002, {"order_id": 7}) == {
            "code": 0, "cmdid": 10002, "data": {"order_id": 7}, "total": 1}  # one line, the seed's extra field
        assert _seed_call(conn, 10002, {"order_id": 8}) == {
            "code": 1005, "cmdid": 10002, "msg": "no order 8", "order_id": 8}
        assert _seed_call(conn, 10004, {}) == {"code": 0, "cmdid": 10004, "data": "plain text, not a reply line"}
        # A transport code from a handler (503 reads as "not processed, resend") is never sent: a 500.
        assert _seed_call(conn, 10003, {}) == {"code": 500, "cmdid": 10003, "msg": "internal error"}
        # Pipelined, with ids: each reply carries its request's id, in order.
        conn.send(b"".join(json.dumps({"cmdid": 10001, "params": {"name": f"u{i}"}, "id": i}).encode() + b"\n"
                           for i in range(5)))
        assert [conn.line() for _ in range(5)] == [
            {"code": 0, "cmdid": 10001, "data": {"name": f"u{i}", "level": 3}, "id": i} for i in range(5)]


@pytest.mark.subprocess
def test_geventtcp_client_matches_and_maps_seed_replies(seed_server: CliServer) -> None:
    client = Client(f"{seed_server.host}:{seed_server.port}")
    try:
        assert client.call(10001, {"name": "bob"}) == {"name": "bob", "level": 3}
        with pytest.raises(NotFound) as not_found:  # the handler ran: never "not processed"
            client.call(10002, {"order_id": 9})
        assert not_found.value.msg == "no order 9" and not_found.value.reply["order_id"] == 9
        with pytest.raises(InternalServerError):
            client.call(10003, {})
        assert client.list()  # the built-ins the issue asked for exist
        assert client.stats()["commands"]["10001"]["count"] >= 1
    finally:
        client.close()


CODEC = get_codec("simplejson")


@pytest.mark.parametrize(("res", "has_id", "expected", "code"), [
    # A reply object, with its line's newline, JSON whitespace and newlines inside: re-encoded on one line.
    ('{"code": 0, "data": 1}\n', False, {"code": 0, "data": 1, "cmdid": 5}, 0),
    (b'\r\n {\n "code": 0,\n "cmdid": 9\n}\r\n', False, {"code": 0, "cmdid": 9}, 0),
    # The request's id replaces the handler's; without one, the handler's is dropped.
    ('{"code": 0, "id": "theirs"}', True, {"code": 0, "id": "ours", "cmdid": 5}, 0),
    ('{"code": 0, "id": "theirs"}', False, {"code": 0, "cmdid": 5}, 0),
    ('{"code": 400, "msg": "bad"}', False, {"code": 400, "msg": "bad", "cmdid": 5}, 400),
    # Codes a handler cannot answer with (HandlerError's rule): transport codes, the seed's own ones.
    ('{"code": 503}', True, {"code": 500, "cmdid": 5, "id": "ours", "msg": "internal error"}, 500),
    ('{"code": 1}', False, {"code": 500, "cmdid": 5, "msg": "internal error"}, 500),
    ('{"code": -1}', False, {"code": 500, "cmdid": 5, "msg": "internal error"}, 500),
    # Not a reply object: the text is data, as before.
    ('{"code": true}', False, {"code": 0, "cmdid": 5, "data": '{"code": true}'}, 0),
    ('{"code": 0.0}', False, {"code": 0, "cmdid": 5, "data": '{"code": 0.0}'}, 0),
    ('{"data": 1}', False, {"code": 0, "cmdid": 5, "data": '{"data": 1}'}, 0),
    ('{"code": 0', False, {"code": 0, "cmdid": 5, "data": '{"code": 0'}, 0),
    ('{"code": 0}\n{"code": 0}\n', False, {"code": 0, "cmdid": 5, "data": '{"code": 0}\n{"code": 0}\n'}, 0),
    ('{"code": 0, "code": 1}', False, {"code": 0, "cmdid": 5, "data": '{"code": 0, "code": 1}'}, 0),
    ('[{"code": 0}]', False, {"code": 0, "cmdid": 5, "data": '[{"code": 0}]'}, 0),
])
def test_the_seed_reply_rule(res: str | bytes, has_id: bool, expected: dict[str, Any], code: int) -> None:
    line, got = encode_seed_reply(CODEC, res, 5, "ours" if has_id else None, has_id)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the handler wrote
    assert json.loads(line) == expected and got == code


def test_lone_surrogates_never_reach_the_wire() -> None:
    escaped = '{"code": 0, "data": "\\ud800"}'  # the strict parse refuses it: it is not a reply, but data
    line, code = encode_seed_reply(CODEC, escaped, 5, None, False)
    assert json.loads(line) == {"code": 0, "cmdid": 5, "data": escaped} and code == 0
    with pytest.raises(ValueError):  # a lone surrogate itself has no UTF-8 form: the server answers 500
        encode_seed_reply(CODEC, '{"code": 0, "data": "\ud800"}', 5, None, False)


def test_seed_reply_module_is_a_real_seed_module(tmp_path: Path) -> None:
    """Guard on the fixture itself: only import lines mention geventtcp."""
    lines = [line for line in SEED_APP.splitlines() if "geventtcp" in line]
    assert lines == ["from geventtcp import urls, BaseHandler, Request"]


def test_a_seed_reply_is_a_success_to_middleware_and_flask_hooks(serve: Callable[..., Server]) -> None:
    """Review round 3: a seed handler's ``self.res`` (a reply line, or plain text) is the handler's
    answer, not an exception: a middleware must not see an error, after_request must run and
    teardown_request must get ``None`` (a Flask-style teardown commits on ``None``, rolls back otherwise)."""
    reg = Registry()

    class Line(BaseHandler):
        def process(self, request: Request) -> Any:
            self.res = json.dumps({"code": 0, "cmdid": 1, "data": {"n": 1}}) + "\n"

    class Text(BaseHandler):
        def process(self, request: Request) -> Any:
            self.res = "plain text"

    class Missing(BaseHandler):
        def process(self, request: Request) -> Any:
            self.res = json.dumps({"code": 1005, "msg": "no order"})

    reg.add(1, Line)
    reg.add(2, Text)
    reg.add(3, Missing)
    events: list[Any] = []

    @reg.middleware
    def errors(request: Request, call_next: Callable[[Request], Any]) -> Any:
        try:
            return call_next(request)
        except Exception as exc:  # what an error-reporting middleware does
            events.append(("error", request.cmdid, type(exc).__name__))
            raise

    @reg.after_request
    def after(request: Request, data: Any) -> Any:
        events.append(("after", request.cmdid))
        return data

    @reg.teardown_request
    def teardown(request: Request, exc: BaseException | None) -> None:
        events.append(("teardown", request.cmdid, None if exc is None else type(exc).__name__))

    server = serve(reg)
    with RawConn(server.address) as conn:
        assert _seed_call(conn, 1, {}) == {"code": 0, "cmdid": 1, "data": {"n": 1}}
        assert _seed_call(conn, 2, {}) == {"code": 0, "cmdid": 2, "data": "plain text"}
        assert _seed_call(conn, 3, {}) == {"code": 1005, "cmdid": 3, "msg": "no order"}
    with Client(addr(server), timeout=5) as client:  # with ids, through geventtcp's client
        assert client.call(1) == {"n": 1}
    assert events == [("after", 1), ("teardown", 1, None), ("after", 2), ("teardown", 2, None),
                      ("after", 3), ("teardown", 3, None), ("after", 1), ("teardown", 1, None)]
