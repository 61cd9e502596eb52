"""Hypothesis state machine: random sequences of connects, good/bad/split/pipelined lines and closes,
checked against the nothing-lost invariant (one reply per request line, in order, ids intact)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from geventtcp.server.server import Server
from tests.support.apps import make_registry
from tests.support.rawconn import RawConn

BAD_LINES = [b'{"cmdid":1,', b'{"cmdid":1,"params":{"x":NaN}}', b"\xff\xfe", b"[" * 3000, b'{"cmdid":1,"cmdid":1}']


class Connections(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = Server(make_registry(), bind="127.0.0.1:0", max_line_bytes=4096)
        self.server.start()
        self.conns: list[tuple[RawConn, list[Any]]] = []  # (connection, expected replies in order)
        self.next_id = 0

    def teardown(self) -> None:
        for conn, _ in self.conns:
            conn.close()
        self.server.close()

    @rule()
    def connect(self) -> None:
        if len(self.conns) < 4:
            self.conns.append((RawConn(self.server.address), []))

    @precondition(lambda self: self.conns)
    @rule(which=st.integers(0, 3), payload=st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
          cut=st.integers(0, 40))
    def good(self, which: int, payload: dict[str, int], cut: int) -> None:
        conn, expected = self.conns[which % len(self.conns)]
        self.next_id += 1
        line = json.dumps({"cmdid": 1, "id": self.next_id, "params": payload}).encode() + b"\n"
        conn.send(line[:cut])  # split at a random point: framing must not care
        conn.send(line[cut:])
        expected.append({"code": 0, "cmdid": 1, "id": self.next_id, "data": payload})

    @precondition(lambda self: self.conns)
    @rule(which=st.integers(0, 3), bad=st.sampled_from(BAD_LINES))
    def bad(self, which: int, bad: bytes) -> None:
        conn, expected = self.conns[which % len(self.conns)]
        conn.send(bad + b"\n")
        expected.append(400)

    @precondition(lambda self: self.conns)
    @rule(which=st.integers(0, 3))
    def too_long(self, which: int) -> None:
        conn, expected = self.conns[which % len(self.conns)]
        conn.send(b'{"cmdid":1,"params":{"s":"' + b"x" * 5000 + b'"}}\n')
        expected.append(413)

    @precondition(lambda self: self.conns)
    @rule(which=st.integers(0, 3), n=st.integers(1, 20))
    def pipelined(self, which: int, n: int) -> None:
        conn, expected = self.conns[which % len(self.conns)]
        batch = b""
        for _ in range(n):
            self.next_id += 1
            batch += b'{"cmdid":2,"id":%d,"params":{"seconds":0}}\n' % self.next_id
            expected.append({"code": 0, "cmdid": 2, "id": self.next_id, "data": {"slept": 0}})
        conn.send(batch)

    @precondition(lambda self: self.conns)
    @rule(which=st.integers(0, 3))
    def read_all(self, which: int) -> None:
        conn, expected = self.conns[which % len(self.conns)]
        for want in expected:
            got = conn.line()
            if isinstance(want, int):
                assert got["code"] == want and got["cmdid"] is None, got
            else:
                assert got == want
        expected.clear()

    @precondition(lambda self: self.conns)
    @rule(which=st.integers(0, 3))
    def close(self, which: int) -> None:
        conn, _ = self.conns.pop(which % len(self.conns))
        conn.close()  # with or without unread replies: the server must cope

    @invariant()
    def server_alive(self) -> None:
        assert self.server.started


Connections.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                         suppress_health_check=list(HealthCheck))
test_connection_state_machine = pytest.mark.slow(Connections.TestCase)
