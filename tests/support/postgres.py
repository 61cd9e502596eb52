"""A real PostgreSQL for tests, CI and benchmarks: a private throw-away server, or the one a DSN names.

:func:`running` (what the ``pg_dsn`` fixture of ``tests/conftest.py`` uses) yields
``$GEVENTTCP_TEST_PG_DSN`` when it is set (CI starts one server for the whole run, see ``.ci/run``);
otherwise a :class:`PostgresServer` is started: ``initdb`` in a new temporary directory (as the
``postgres`` user when this process is root: PostgreSQL refuses to run as root), a free port on
127.0.0.1, its unix socket in that directory, ``trust`` authentication, fsync and synchronous commit
off (a test database need not survive a crash), ``max_connections`` 300 (``bench/pg_sleep.py`` holds
200). ``stop()`` shuts it down at once and removes the directory.

Missing binaries are an error, never a skip: the tests that need PostgreSQL fail with
:class:`PostgresUnavailable` naming what to install. The binaries are found on ``$PATH``, else in
the newest ``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package), else in
``$GEVENTTCP_TEST_PG_BIN``.

The same code serves shell scripts: ``python -m tests.support.postgres start`` prints ``export``
lines (``GEVENTTCP_TEST_PG_DSN``, ``GEVENTTCP_TEST_PG_DIR``) for ``eval``, and
``python -m tests.support.postgres stop DIR`` stops that server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DSN_ENV", "PostgresServer", "PostgresUnavailable", "find_bindir", "free_port", "new_database", "running"]

#: The environment variable naming an existing server (a libpq DSN or URL); set, nothing is started.
DSN_ENV = "GEVENTTCP_TEST_PG_DSN"
DIR_ENV = "GEVENTTCP_TEST_PG_DIR"
BIN_ENV = "GEVENTTCP_TEST_PG_BIN"

#: Settings of the private server: fast and disposable (nothing survives it), room for the benchmark.
SERVER_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 300
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
"""


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (binaries or the ``postgres`` user missing, initdb failed)."""


def find_bindir() -> str:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``; :class:`PostgresUnavailable` if none."""
    candidates = [os.environ.get(BIN_ENV, "")]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    for bindir in filter(None, candidates):
        if all(os.access(os.path.join(bindir, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, in /usr/lib/postgresql/*/bin "
        f"or ${BIN_ENV}: install them (Debian/Ubuntu: apt-get install postgresql), or point ${DSN_ENV} at a "
        "running server (e.g. postgresql://postgres@127.0.0.1:5432/postgres)")


def _version(bindir: str) -> tuple[int, ...]:
    name = Path(bindir).parent.name
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """A private PostgreSQL in its own temporary directory; ``dsn`` once :meth:`start` returned.

    Owns the directory (data, socket, log) and the server process; :meth:`stop` ends both, and is
    safe to call twice or after a failed start.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.bindir = find_bindir()
        self.directory = directory or tempfile.mkdtemp(prefix="geventtcp-pg-")
        self.port = 0
        self._as_postgres = os.geteuid() == 0  # initdb and postgres refuse root
        if self._as_postgres:
            try:
                import pwd

                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, and there is no 'postgres' user to run PostgreSQL as "
                                          "(Debian's postgresql package creates it)") from None
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        argv = [os.path.join(self.bindir, tool), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log = os.path.join(self.directory, "server.log")
            tail = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
            raise PostgresUnavailable(f"{tool} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}{tail}")

    def start(self, attempts: int = 3) -> str:
        """initdb and start the server; its DSN. A port taken between probe and bind is retried."""
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")
        for attempt in range(attempts):
            self.port = free_port()
            conf = SERVER_CONF.format(port=self.port, socket_dir=self.directory)
            Path(self.data, "postgresql.auto.conf").write_text(conf)
            try:
                self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l",
                          os.path.join(self.directory, "server.log"))
                return self.dsn
            except PostgresUnavailable:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            try:
                self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", self.data)
            except PostgresUnavailable as exc:
                print(f"warning: {exc}", file=sys.stderr)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[str]:
    """The DSN of ``$GEVENTTCP_TEST_PG_DSN``, else of a private server started now and stopped on exit."""
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        yield dsn
        return
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


def new_database(dsn: str, name: str) -> str:
    """Create (or recreate, empty) database ``name`` on the server of ``dsn``; the DSN that names it.

    A test module or an example's tests get tables of their own this way on a shared server.
    """
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(dsn, dbname=name)


def main(argv: list[str]) -> int:
    """``start [DIR]`` prints export lines for a shell's eval; ``stop DIR`` stops that server."""
    if argv[:1] == ["start"] and len(argv) <= 2:
        server = PostgresServer(argv[1] if len(argv) == 2 else None)
        try:
            dsn = server.start()
        except BaseException:
            server.stop()
            raise
        print(f"export {DSN_ENV}={shlex.quote(dsn)} {DIR_ENV}={shlex.quote(server.directory)}")
        return 0
    if argv[:1] == ["stop"] and len(argv) == 2:
        server = PostgresServer(argv[1])
        server.stop()
        return 0
    print("usage: python -m tests.support.postgres start [DIR] | stop DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
