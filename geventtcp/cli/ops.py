"""Operations verbs of the command line: ``ping``, ``list`` and ``stats`` of a running server, ``settings``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from geventtcp.cli.commands import command
from geventtcp.cli.options import add_security_arguments, client_security

if TYPE_CHECKING:
    from geventtcp.client.client import Client

__all__ = ["ask"]


def ask(address: str, question: Callable[[Client], Any], timeout: float = 5.0, **client_kwargs: Any) -> Any:
    """``question(client)`` (e.g. ``Client.stats``) with a :class:`geventtcp.client.Client` of ``address``.

    Returns what it returns, the reply's data. Raises a ``geventtcp`` transport error (an ``OSError``)
    when the server cannot be reached, and a ``RemoteError`` when it answers with an error code; a
    goaway is retried by the client. The connection is closed on return. ``client_kwargs`` (TLS,
    auth) go to the Client.
    """
    from geventtcp.client.client import Client

    with Client(address, timeout=timeout, connect_timeout=timeout, mode="threads", **client_kwargs) as client:
        return question(client)


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST:PORT", help="server address (HOST:PORT, [IPv6]:PORT or unix:PATH)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply [default: 5]")
    parser.add_argument("--json", action="store_true", help="print the raw JSON reply")
    add_security_arguments(parser)


def _verb(args: argparse.Namespace, question: Callable[[Client], Any], show: Callable[[Any], None],
          indent: int | None = 2) -> int:
    """Ask the server ``question`` (a Client method: ping, list, stats); print the reply's data
    (``show`` it, or as JSON with --json). Exit status.

    Any failure (unreachable, a transport error, a RemoteError reply) is printed on stderr: exit 1.
    """
    try:
        data = ask(args.address, question, args.timeout, **client_security(args))
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError or RemoteError: each is the answer
        print(f"geventtcp: {args.address}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=indent))
    else:
        show(data)
    return 0


@command("ping", "check that a server answers (reports whether it is draining)", _address_argument)
def _ping(args: argparse.Namespace) -> int:
    def show(data: Any) -> None:
        print(f"pong from pid {data.get('pid')} (draining: {data.get('draining')})")

    return _verb(args, lambda client: client.ping(), show, indent=None)


@command("list", "list the commands a server registers (cmdid, handler, docstring, params)", _address_argument)
def _list(args: argparse.Namespace) -> int:
    def show(data: Any) -> None:
        for item in data:
            flag = " (idempotent)" if item.get("idempotent") else ""
            print(f"{item['cmdid']:>8}  {item['name']}{flag}")
            if item.get("doc"):
                print(f"{'':>10}{item['doc'].splitlines()[0]}")
            if isinstance(item.get("params"), dict):
                print(f"{'':>10}params: {_params_summary(item['params'])}")

    return _verb(args, lambda client: client.list(), show)


def _params_summary(schema: dict[str, Any]) -> str:
    """``Order {customer, items, note?}`` from a params JSON Schema (``?``: optional); --json shows it all."""
    required = set(schema.get("required", ()))
    fields = ", ".join(name if name in required else f"{name}?" for name in schema.get("properties", {}))
    return f"{schema.get('title', 'object')} {{{fields}}}"


@command("stats", "show a server's per-command and per-worker statistics", _address_argument)
def _stats(args: argparse.Namespace) -> int:
    return _verb(args, lambda client: client.stats(), _print_stats)


def _print_stats(data: Any) -> None:
    print(f"{'cmdid':>8} {'count':>10} {'errors':>8} {'inflight':>8} {'mean ms':>9} {'p50 ms':>8} "
          f"{'p90 ms':>8} {'p99 ms':>8}")
    for cmdid, c in data.get("commands", {}).items():
        print(f"{cmdid:>8} {c['count']:>10} {c['errors']:>8} {c.get('inflight', 0):>8} {c['mean_ms']:>9} "
              f"{c['p50_ms']:>8} {c['p90_ms']:>8} {c['p99_ms']:>8}")
    workers = data.get("workers") or [{"pid": data.get("pid"), "connections": data.get("connections"),
                                        "uptime_s": data.get("uptime_s")}]
    print(f"\n{'worker pid':>10} {'connections':>12} {'uptime s':>10} {'requests':>10}")
    for w in workers:
        print(f"{w.get('pid')!s:>10} {w.get('connections')!s:>12} {w.get('uptime_s')!s:>10} "
              f"{w.get('requests', '-')!s:>10}")


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="the README's settings table")


@command("settings", "list every setting (flag, env var, default); --markdown for the README table",
         _settings_arguments)
def _settings(args: argparse.Namespace) -> int:
    from geventtcp.config import SETTINGS, render_markdown

    if args.markdown:
        print(render_markdown())
        return 0
    for s in SETTINGS:
        print(f"{s.name:<28} {', '.join(s.flags):<28} {s.env:<40} default {s.default!r}")
    return 0
