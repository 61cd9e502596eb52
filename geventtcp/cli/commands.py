"""The command table of the ``geventtcp`` command line: each verb module registers its verb here.

Verb modules import this module, never :mod:`geventtcp.cli.main`, so the parser can import them
without an import cycle.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["COMMANDS", "Verb", "command"]

Verb = Callable[[argparse.Namespace], int]

#: name -> (help, add its arguments, run it).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Verb]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Verb], Verb]:
    """Register the decorated function as the verb ``name``."""
    def register(run: Verb) -> Verb:
        COMMANDS[name] = (help, arguments, run)
        return run

    return register
