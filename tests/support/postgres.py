"""A real PostgreSQL for tests, CI and benchmarks: a private throw-away server, or the one a DSN names.

:func:`running` (what the ``pg_dsn`` fixture of ``tests/conftest.py`` uses) yields
``$GEVENTTCP_TEST_PG_DSN`` when it is set (CI starts one server for the whole run, see ``.ci/run``);
otherwise a :class:`PostgresServer` is started: ``initdb`` in a new temporary directory, a free port
on 127.0.0.1, its unix socket in that directory, ``trust`` authentication, fsync and synchronous
commit off (a test database need not survive a crash), ``max_connections`` 300
(``bench/pg_sleep.py`` holds 200). ``stop()`` shuts it down at once and removes the directory.

The binaries (:func:`find_bindir`, the order of ``tests.support.binaries``): ``$GEVENTTCP_TEST_PG_BIN``,
``pg_ctl``'s directory on ``$PATH``, the newest ``/usr/lib/postgresql/*/bin`` (Debian's
``postgresql`` package), then the PostgreSQL inside the installed ``pgserver`` wheel (the ``test``
extra brings it). Missing binaries are an error, never a skip: the tests that need PostgreSQL fail
with :class:`PostgresUnavailable` saying what brings them.

PostgreSQL refuses to run as root. As root, every PostgreSQL command runs through ``runuser -u``
as ``$GEVENTTCP_TEST_PG_USER``, else ``postgres`` (Debian's package creates it), else ``nobody``
(present on any Linux: a fresh container has no ``postgres`` user), and the temporary directory is
chowned to that user. Nothing on the machine is created or changed for it, and ``nobody`` gains no
access it lacks already: the server trusts every local connection anyway. That user must be able to
read the binaries (a virtualenv under a ``0700`` home is not): the failure says so.

The same code serves shell scripts: ``python -m tests.support.postgres start`` prints ``export``
lines (``GEVENTTCP_TEST_PG_DSN``, ``GEVENTTCP_TEST_PG_DIR``) for ``eval``, and
``python -m tests.support.postgres stop DIR`` stops that server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support import binaries

__all__ = ["DSN_ENV", "PostgresServer", "PostgresUnavailable", "find_bindir", "free_port", "new_database", "run_as",
           "running"]

#: The environment variable naming an existing server (a libpq DSN or URL); set, nothing is started.
DSN_ENV = "GEVENTTCP_TEST_PG_DSN"
DIR_ENV = "GEVENTTCP_TEST_PG_DIR"
BIN_ENV = "GEVENTTCP_TEST_PG_BIN"
#: As root: the user PostgreSQL runs as (default: ``postgres``, else ``nobody``).
USER_ENV = "GEVENTTCP_TEST_PG_USER"
TOOLS = ("initdb", "pg_ctl", "postgres")

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


class PostgresUnavailable(binaries.ServerUnavailable):
    """PostgreSQL cannot be started here (binaries or a user to run them as missing, initdb failed)."""


def find_bindir() -> str:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``; :class:`PostgresUnavailable` if none."""
    candidates: list[str | None] = []
    if binaries.use_system():
        candidates.append(os.environ.get(BIN_ENV))
        on_path = shutil.which("pg_ctl")
        if on_path:  # /usr/local/bin/pg_ctl may be a lone symlink into the real bin directory
            candidates.append(os.path.dirname(os.path.realpath(on_path)))
        debian: list[str] = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
        candidates += debian
    if binaries.use_packages():
        candidates.append(binaries.package_dir("pgserver", "pginstall", "bin"))
    found = binaries.first_with(candidates, TOOLS)
    if found is None:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found{binaries.narrowed()}: "
            f"{binaries.PIP_HINT} (the pgserver package), or install PostgreSQL (PATH, /usr/lib/postgresql/*/bin "
            f"or ${BIN_ENV}), or point ${DSN_ENV} at a running server "
            "(e.g. postgresql://postgres@127.0.0.1:5432/postgres)")
    return found


def run_as() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as when this process is root (see the module docstring); None when not root."""
    if os.geteuid() != 0:
        return None
    if _runuser() is None:
        raise PostgresUnavailable("running as root, and runuser (util-linux) is missing: PostgreSQL refuses to run "
                                  f"as root; run the tests as another user, or point ${DSN_ENV} at a running server")
    chosen = os.environ.get(USER_ENV)
    for name in [chosen] if chosen else ["postgres", "nobody"]:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            if entry.pw_uid != 0:
                return entry
    raise PostgresUnavailable(
        f"running as root, and no user {chosen or 'postgres or nobody'} (not root) to run PostgreSQL as "
        f"(it refuses root): set ${USER_ENV} to an existing user, run the tests as a user other than root, "
        f"or point ${DSN_ENV} at a running server")


def _runuser() -> str | None:
    """util-linux's runuser: on PATH, else in /usr/sbin or /sbin (a PATH without sbin is common)."""
    return shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")


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
        self.user = run_as()  # initdb and postgres refuse root
        self.directory = directory or tempfile.mkdtemp(prefix="geventtcp-pg-")
        self.port = 0
        if self.user is not None:
            os.chown(self.directory, self.user.pw_uid, self.user.pw_gid)

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        argv = [os.path.join(self.bindir, tool), *args]
        if self.user is not None:
            argv = [_runuser() or "runuser", "-u", self.user.pw_name, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log = os.path.join(self.directory, "server.log")
            tail = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
            raise PostgresUnavailable(f"{tool} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}{tail}"
                                      f"{self._access_hint(tool)}")

    def _access_hint(self, tool: str) -> str:
        """After a failure as another user: whether that user could run the binary at all (a 0700 home)."""
        if self.user is None:
            return ""
        path = os.path.join(self.bindir, tool)
        probe = subprocess.run([_runuser() or "runuser", "-u", self.user.pw_name, "--", "test", "-x", path],
                               capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        if probe.returncode == 0:
            return ""
        return (f"\n(user {self.user.pw_name!r}, which runs PostgreSQL because this process is root, cannot execute "
                f"{self.bindir}: make it readable, e.g. a virtualenv outside a 0700 home directory)")

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
