"""The ``geventtcp`` command line: ``main(argv) -> exit code``; one sub-command per verb.

Each verb lives in its own module (``serve``, ``ops``, ``call``, ``bench``) and registers itself in
:data:`geventtcp.cli.commands.COMMANDS` when imported; this module only builds the parser.
"""

from __future__ import annotations

import argparse

from geventtcp.cli.commands import COMMANDS

__all__ = ["main", "build_parser", "COMMANDS"]

#: The order ``--help`` lists the verbs in: running a server first, then asking one, then loading one.
ORDER = ("serve", "ping", "list", "stats", "settings", "call", "bench")


def build_parser() -> argparse.ArgumentParser:
    from geventtcp import __version__
    from geventtcp.cli import bench, call, ops, serve  # noqa: F401 - importing registers their verbs

    parser = argparse.ArgumentParser(prog="geventtcp", description="Newline-delimited JSON over TCP, on gevent.")
    parser.add_argument("--version", action="version", version=f"geventtcp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted(COMMANDS, key=lambda name: ORDER.index(name) if name in ORDER else len(ORDER)):
        help_text, arguments, run = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
