"""TLS and AUTH options shared by the client verbs of the command line (``call``, ``ping``, ``list``, ``stats``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from geventtcp.errors import ConfigError

__all__ = ["add_security_arguments", "client_security"]


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tls``, ``--ca-certs``, ``--certfile``/``--keyfile``, ``--server-hostname``, ``--auth-token-file``."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server against the "
                       "system CAs (implied by --ca-certs)")
    group.add_argument("--ca-certs", metavar="FILE", help="PEM CA bundle to verify the server with")
    group.add_argument("--certfile", metavar="FILE", help="client certificate (mutual TLS)")
    group.add_argument("--keyfile", metavar="FILE", help="client private key (default: inside --certfile)")
    group.add_argument("--server-hostname", metavar="NAME", help="name to check in the server's certificate "
                       "[default: the address's host]")
    group.add_argument("--auth-token-file", metavar="FILE", help="send AUTH with the secret in FILE first "
                       "(or set GEVENTTCP_AUTH_TOKEN)")


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :class:`geventtcp.client.Client` from the options; ConfigError if unusable."""
    kwargs: dict[str, Any] = {}
    if args.tls or args.ca_certs or args.certfile:
        from geventtcp.tls import client_context

        kwargs["ssl_context"] = client_context(ca_certs=args.ca_certs, certfile=args.certfile, keyfile=args.keyfile)
        if args.server_hostname:
            kwargs["server_hostname"] = args.server_hostname
    token = os.environ.get("GEVENTTCP_AUTH_TOKEN") or None
    if args.auth_token_file:
        try:
            with open(args.auth_token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {args.auth_token_file}: {exc}") from None
    if token:
        kwargs["auth_token"] = token
    return kwargs
