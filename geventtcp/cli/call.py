"""The ``call`` verb: one request from the command line through :class:`Client`, like ``redis-cli``'s.

(``ping``, ``list`` and ``stats`` of the built-in commands live in :mod:`geventtcp.cli_ops`.)

Exit codes:

    0  success: the reply's ``data`` is printed as JSON on stdout
    1  the server replied with an error code: ``error <code>: <msg>`` on stderr (then
       ``details: <JSON>`` when the reply has details)
    2  bad command line (unreadable params or --meta JSON, a meta the protocol refuses, bad address)
    3  not sent: could not connect, or the server refused/drained before processing (safe to retry)
    4  the connection broke after the request was written: it may have run
    5  timed out waiting for the reply: it may have run
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from geventtcp.cli.commands import command
from geventtcp.cli.options import add_security_arguments, client_security
from geventtcp.protocol import meta_problem

__all__ = ["EXIT_OK", "EXIT_REMOTE", "EXIT_USAGE", "EXIT_NOT_SENT", "EXIT_MAYBE", "EXIT_TIMEOUT"]

EXIT_OK, EXIT_REMOTE, EXIT_USAGE, EXIT_NOT_SENT, EXIT_MAYBE, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds for the whole call, retries included [default: 10]")
    parser.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                        help="seconds to open the connection [default: 5]")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="resend up to N times when that is safe [default: 2]")
    add_security_arguments(parser)


def _call_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST:PORT", help="server address (or a comma-separated list)")
    parser.add_argument("cmdid", type=int, metavar="CMDID", help="command id")
    parser.add_argument("params", nargs="?", default="{}", metavar="PARAMS",
                        help="request params as a JSON object [default: {}]")
    parser.add_argument("--idempotent", action="store_true",
                        help="the command may run twice: also resend after a connection broke mid-call")
    parser.add_argument("--compact", action="store_true", help="print the JSON on one line")
    parser.add_argument("--meta", metavar="JSON",
                        help='request metadata as a JSON object of strings, e.g. \'{"api_key": "k1"}\'')
    _common(parser)


def _run(args: argparse.Namespace, cmdid: int, params: Any, idempotent: bool,
         meta: dict[str, str] | None = None) -> tuple[int, Any]:
    from geventtcp.client.client import Client
    from geventtcp.errors import CallTimeout, ConfigError, MaybeExecuted, NotSent, RemoteError, TransportError

    try:
        with Client(args.address.split(","), timeout=args.timeout, connect_timeout=args.connect_timeout,
                    retries=args.retries, mode="threads", **client_security(args)) as client:
            data = client.call(cmdid, params, idempotent=idempotent, meta=meta)
    except RemoteError as exc:
        print(f"error {exc.code}: {exc.msg}", file=sys.stderr)
        if exc.details is not None:  # a 400's bad fields, a dependency's reason: what to fix
            print(f"details: {json.dumps(exc.details, ensure_ascii=False)}", file=sys.stderr)
        return EXIT_REMOTE, None
    except ConfigError as exc:
        print(f"geventtcp: {exc}", file=sys.stderr)
        return EXIT_USAGE, None
    except CallTimeout as exc:
        print(f"timeout: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT, None
    except MaybeExecuted as exc:
        print(f"connection lost after sending (the request may have run): {exc}", file=sys.stderr)
        return EXIT_MAYBE, None
    except (NotSent, TransportError) as exc:
        print(f"not sent: {exc}", file=sys.stderr)
        return EXIT_NOT_SENT, None
    return EXIT_OK, data


@command("call", "send one request and print the reply's data as JSON", _call_arguments)
def _call(args: argparse.Namespace) -> int:
    try:
        params = json.loads(args.params)
    except ValueError as exc:
        print(f"geventtcp: PARAMS is not valid JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(params, dict):
        print("geventtcp: PARAMS must be a JSON object", file=sys.stderr)
        return EXIT_USAGE
    meta = None
    if args.meta is not None:
        try:
            meta = json.loads(args.meta)
        except ValueError as exc:
            print(f"geventtcp: --meta is not valid JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
        problem = "must be a JSON object" if not isinstance(meta, dict) else meta_problem(meta)
        if problem is not None:
            print(f"geventtcp: --meta {problem}", file=sys.stderr)
            return EXIT_USAGE
    status, data = _run(args, args.cmdid, params, args.idempotent, meta)
    if status == EXIT_OK:
        print(json.dumps(data, ensure_ascii=False, indent=None if args.compact else 2))
    return status
