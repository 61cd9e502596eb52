"""Chaos under load (case 36): workers killed with kill -9 again and again while callers keep calling.

A client-side ledger records how every call ended; the server-side execution log (the handler
appends to a file) shows which ran. Together they prove: every call ended clearly (a reply, or an
exception saying whether it may have run), nothing ran twice, and nothing reported as "not
processed" ran at all.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import textwrap
from pathlib import Path

import gevent
import pytest

from tests.support.launcher import Launcher
from tests.support.rawconn import RawConn
from tests.support.system import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

APP = textwrap.dedent('''
    import os
    import time

    from geventtcp import Registry

    registry = Registry()
    LOG = os.environ["CHAOS_LOG"]

    @registry.handler(100)  # NOT idempotent: must never run twice for one token
    def record(request):
        token = request.params["token"]
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{token} {os.getpid()}\\n".encode())  # one O_APPEND write: atomic
        finally:
            os.close(fd)
        time.sleep(request.params.get("delay", 0))  # widens the executed-but-not-answered window
        return {"token": token, "pid": os.getpid()}
''')

OK, MAYBE, UNPROCESSED = "ok", "maybe_executed", "unprocessed"


class LedgerCaller:
    """One persistent connection, one call at a time; resends only what the server did not process."""

    def __init__(self, address: tuple[str, int], ledger: dict[str, list[str]]) -> None:
        self.address = address
        self.ledger = ledger
        self.conn: RawConn | None = None

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def call(self, token: str) -> str:
        line = json.dumps({"cmdid": 100, "id": token, "params": {"token": token, "delay": random.random() * 0.01},
                           "timeout_ms": 5000}).encode() + b"\n"
        for _ in range(50):
            try:
                if self.conn is None:
                    self.conn = RawConn(self.address, timeout=5)
            except OSError:
                self.ledger[token].append("not_sent")  # nothing was written: resend
                gevent.sleep(0.05)
                continue
            try:
                self.conn.send(line)
                raw = self.conn.raw_line()
            except (OSError, EOFError):  # written (maybe partly), then the connection broke: it may have run
                self._close()
                self.ledger[token].append(MAYBE)
                return MAYBE
            reply = json.loads(raw)
            if reply.get("goaway") or reply.get("code") == 503:  # the server promises it did not run
                self.ledger[token].append(UNPROCESSED)
                self._close()
                continue
            assert reply["id"] == token and reply["code"] == 0, reply  # never someone else's reply
            self.ledger[token].append(OK)
            return OK
        return self.ledger[token][-1]


def test_kill_9_workers_repeatedly_under_load(tmp_path: Path) -> None:
    (tmp_path / "chaosapp.py").write_text(APP)
    exec_log = tmp_path / "executions.log"
    launcher = Launcher(tmp_path, "--workers", "3", app="chaosapp", env={"CHAOS_LOG": str(exec_log)})
    ledger: dict[str, list[str]] = collections.defaultdict(list)
    final: dict[str, str] = {}
    stop = False
    kills: list[int] = []
    try:
        launcher.wait_workers(3)

        def client(n: int) -> None:
            caller = LedgerCaller(launcher.address, ledger)
            i = 0
            while not stop:
                i += 1
                token = f"c{n}-{i}"
                final[token] = caller.call(token)
            caller._close()

        callers = [gevent.spawn(client, n) for n in range(16)]
        wait_until(lambda: len(final) > 200, 30)
        for _ in range(8):  # ~10 s of chaos: a random worker dies every 0.6-1.4 s
            gevent.sleep(0.6 + random.random() * 0.8)
            pids = list(launcher.worker_pids())
            victim = random.choice(pids)
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
        launcher.wait_workers(3, exclude=set(kills))  # the master replaced every one
        ok_before = sum(1 for v in final.values() if v == OK)
        wait_until(lambda: sum(1 for v in final.values() if v == OK) > ok_before + 200, 30)  # traffic recovered
        stop = True
        gevent.joinall(callers, timeout=15, raise_error=True)
        assert all(g.dead for g in callers), "a caller hung"
    finally:
        stop = True
        launcher.close()

    executed = collections.Counter(row.split()[0] for row in exec_log.read_text().splitlines())
    outcomes = collections.Counter(final.values())
    print(f"chaos: {len(kills)} workers killed; {len(final)} calls: {dict(outcomes)}; "
          f"resends after not-processed: {sum(v.count(UNPROCESSED) + v.count('not_sent') for v in ledger.values())}; "
          f"maybe-executed that ran: {sum(1 for t, v in final.items() if v == MAYBE and executed[t])}")
    assert len(kills) == 8
    assert set(final) == set(ledger)  # every call has exactly one final outcome in the ledger
    assert set(outcomes) <= {OK, MAYBE, UNPROCESSED, "not_sent"}
    twice = [t for t, n in executed.items() if n > 1]
    assert twice == [], f"non-idempotent calls executed twice: {twice[:10]}"
    assert set(executed) <= set(final), "the server ran a call no client sent"
    for token, outcome in final.items():
        if outcome == OK:
            assert executed[token] == 1, token
        elif outcome in (UNPROCESSED, "not_sent"):
            assert executed[token] == 0, f"{token} was reported not processed but ran"
    assert outcomes[OK] > 1000
    assert outcomes[MAYBE] <= 16 * len(kills)  # at most the calls in flight on each killed worker


def test_kill_9_with_the_real_client_never_runs_a_call_twice(tmp_path: Path) -> None:
    """The same chaos through geventtcp.Client (its own retries on): the client's retry policy must
    never resend a non-idempotent call whose outcome is unknown."""
    from geventtcp.client.client import Client
    from geventtcp.errors import ConnectError, MaybeExecuted, NotSent, RemoteError, Unprocessed

    (tmp_path / "chaosapp.py").write_text(APP)
    exec_log = tmp_path / "executions.log"
    launcher = Launcher(tmp_path, "--workers", "3", app="chaosapp", env={"CHAOS_LOG": str(exec_log)})
    final: dict[str, str] = {}
    stop = False
    kills: list[int] = []
    try:
        launcher.wait_workers(3)
        address = f"{launcher.address[0]}:{launcher.address[1]}"
        with Client(address, timeout=5, pool_size=2, retries=3) as client:

            def caller(n: int) -> None:
                i = 0
                while not stop:
                    i += 1
                    token = f"c{n}-{i}"
                    try:
                        client.call(100, {"token": token, "delay": random.random() * 0.01})
                        final[token] = OK
                    except MaybeExecuted:  # includes CallTimeout
                        final[token] = MAYBE
                    except (NotSent, ConnectError, Unprocessed):
                        final[token] = UNPROCESSED
                    except RemoteError as exc:
                        final[token] = f"remote {exc.code}"

            callers = [gevent.spawn(caller, n) for n in range(16)]
            wait_until(lambda: len(final) > 200, 30)
            for _ in range(6):
                gevent.sleep(0.6 + random.random() * 0.8)
                victim = random.choice(list(launcher.worker_pids()))
                os.kill(victim, signal.SIGKILL)
                kills.append(victim)
            launcher.wait_workers(3, exclude=set(kills))
            ok_before = sum(1 for v in final.values() if v == OK)
            wait_until(lambda: sum(1 for v in final.values() if v == OK) > ok_before + 200, 30)
            stop = True
            gevent.joinall(callers, timeout=15, raise_error=True)
            assert all(g.dead for g in callers), "a caller hung"
    finally:
        stop = True
        launcher.close()
    executed = collections.Counter(row.split()[0] for row in exec_log.read_text().splitlines())
    outcomes = collections.Counter(final.values())
    print(f"chaos (Client): {len(kills)} workers killed; {len(final)} calls: {dict(outcomes)}")
    assert set(outcomes) <= {OK, MAYBE, UNPROCESSED}, outcomes
    assert [t for t, n in executed.items() if n > 1] == []
    assert set(executed) <= set(final)
    for token, outcome in final.items():
        if outcome == OK:
            assert executed[token] == 1, token
        elif outcome == UNPROCESSED:
            assert executed[token] == 0, f"{token} was reported not processed but ran"
    assert outcomes[OK] > 1000
