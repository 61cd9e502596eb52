"""Database drivers under a real worker, against a real PostgreSQL and redis (docs/cooperative.md).

psycopg2 is a C extension with its own socket, which monkey-patching cannot reach: without a wait
callback ten concurrent ``pg_sleep(0.3)`` run one after another (>= 3 s), the worker warns at start,
and the blocking detector names the psycopg2 frame. With the documented setup (psycogreen, or
psycopg 3 with a pool) they overlap. redis-py needs nothing but the patching.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from geventtcp import Client
from geventtcp.server.blocking import uncooperative_drivers
from tests.support.launcher import Launcher

CONCURRENT = 10
SECONDS = 0.3
SERIAL = CONCURRENT * SECONDS
WARNING = "psycopg2 is imported without a wait callback"


def concurrent_calls(launcher: Launcher, cmdid: int) -> float:
    """Wall time of CONCURRENT simultaneous calls that each wait SECONDS in the server's dependency."""
    host, port = launcher.address
    with Client(f"{host}:{port}", timeout=30) as client:
        client.call(cmdid, {"seconds": 0.01})  # warm: imports, first connections
        started = time.monotonic()
        jobs = [gevent.spawn(client.call, cmdid, {"seconds": SECONDS}) for _ in range(CONCURRENT)]
        gevent.joinall(jobs, raise_error=True)
        return time.monotonic() - started


@pytest.fixture
def serve_dbapp(tmp_path: Path, pg_dsn: str, redis_url: str) -> Iterator[object]:
    """Factory: ``geventtcp serve tests.support.dbapp`` (one worker, blocking detector at 0.1 s) with a driver."""
    started: list[Launcher] = []

    def start(driver: str) -> Launcher:
        launcher = Launcher(tmp_path, "--workers", "1", "--blocking-time", "0.1", app="tests.support.dbapp",
                            env={"DBAPP_DRIVER": driver, "DBAPP_PG_DSN": pg_dsn, "DBAPP_REDIS_URL": redis_url})
        started.append(launcher)
        launcher.wait_workers(1)
        return launcher

    yield start
    for launcher in started:
        launcher.close()


@pytest.mark.slow
@pytest.mark.subprocess
def test_psycopg2_without_a_wait_callback_serializes_the_worker_warns_and_is_named(serve_dbapp) -> None:
    launcher = serve_dbapp("psycopg2")
    launcher.wait_log(WARNING)
    elapsed = concurrent_calls(launcher, 1)
    assert elapsed >= SERIAL, elapsed  # one after another: the hub waited in libpq each time
    # The detector's report names where the loop was stuck: DictCursor.execute in psycopg2.extras,
    # which calls the C execute (the request is named too).
    launcher.wait_log(r"event loop blocked for more than 0\.1s by cmdid 1 \(id \d+, peer 127\.0\.0\.1:\d+\) "
                      r"in psycopg2\.extras \(\S+/psycopg2/extras\.py:\d+, in execute: ")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("driver", ["psycogreen", "psycopg"])
def test_the_documented_setups_overlap_queries_and_do_not_warn(serve_dbapp, driver: str) -> None:
    launcher = serve_dbapp(driver)
    elapsed = concurrent_calls(launcher, 1)
    assert elapsed < SERIAL / 2, elapsed  # overlapped: about one pg_sleep, not ten
    launcher.close()  # all of the worker's output, start-up included, is in
    assert WARNING not in launcher.output
    assert "psycopg2" not in "".join(row for row in launcher.lines if "event loop blocked" in row)


@pytest.mark.slow
@pytest.mark.subprocess
def test_redis_py_is_cooperative_once_monkey_patched(serve_dbapp) -> None:
    elapsed = concurrent_calls(serve_dbapp("psycopg"), 2)
    assert elapsed < SERIAL / 2, elapsed


def test_uncooperative_drivers_names_psycopg2_until_a_wait_callback_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg2.extensions
    from psycogreen.gevent import gevent_wait_callback

    monkeypatch.setattr(psycopg2.extensions, "get_wait_callback", lambda: None)
    assert [m for m in uncooperative_drivers() if WARNING in m]
    monkeypatch.setattr(psycopg2.extensions, "get_wait_callback", lambda: gevent_wait_callback)
    assert not [m for m in uncooperative_drivers() if "psycopg2" in m]


def test_uncooperative_drivers_names_mysqlclient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "MySQLdb", raising=False)
    assert not [m for m in uncooperative_drivers() if "MySQLdb" in m]
    monkeypatch.setitem(sys.modules, "MySQLdb", types.ModuleType("MySQLdb"))
    assert [m for m in uncooperative_drivers() if "Use PyMySQL" in m]

