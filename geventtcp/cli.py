"""The ``geventtcp`` command line: ``main(argv) -> exit code``; one sub-command per verb."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["main", "build_parser", "COMMANDS"]

#: name -> (add its arguments, run it); other modules' verbs register here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[
        [Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, arguments, run)
        return run

    return register


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_arguments

    parser.add_argument("app", help="module (or module:attr) whose handlers to serve, e.g. 'handlers'")
    parser.add_argument("-c", "--config", dest="config_file", metavar="FILE",
                        help="config file: TOML, or Python assignments (env GEVENTTCP_CONFIG)")
    add_arguments(parser)


@command("serve", "run a server for an application's handlers", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    # Patch before the application (or anything it imports) creates sockets, locks or threads, so
    # that plain blocking handler code yields to other connections.
    from gevent import monkey

    monkey.patch_all()
    from .config import load
    from .errors import ConfigError
    from .log import configure_logging

    try:
        config = load(vars(args), config_file=args.config_file or os.environ.get("GEVENTTCP_CONFIG"))
    except ConfigError as exc:
        print(f"geventtcp: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        return _run_single(args.app, config)
    except ConfigError as exc:  # e.g. protected mode refusing a public address, unreadable TLS files
        print(f"geventtcp: {exc}", file=sys.stderr)
        return 2


def _run_single(app: str, config: Any) -> int:
    import gevent

    from .server import Server
    from .urls import load_registry

    if app not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    registry = load_registry(app)
    server = Server(registry, config=config)
    server.start()

    def graceful() -> None:
        gevent.spawn(server.stop)

    gevent.signal_handler(signal.SIGTERM, graceful)
    gevent.signal_handler(signal.SIGINT, server.close)
    gevent.signal_handler(signal.SIGQUIT, server.close)
    server.serve_forever()
    return 0


#: Modules that add their verbs to COMMANDS when imported (client calls, operations, benchmarks).
VERB_MODULES: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from . import __version__

    for module in VERB_MODULES:
        importlib.import_module(module)

    parser = argparse.ArgumentParser(prog="geventtcp", description="Newline-delimited JSON over TCP, on gevent.")
    parser.add_argument("--version", action="version", version=f"geventtcp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, arguments, run) in COMMANDS.items():
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
