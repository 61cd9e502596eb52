"""Shared-secret authentication (the AUTH builtin) and protected mode, in the spirit of Redis's."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from geventtcp.errors import Code, ConfigError, ServerRefusal
from geventtcp.protocol import PREAUTH_MAX_LINE_BYTES
from geventtcp.server.request import ServerRequest

if TYPE_CHECKING:
    from geventtcp.config import Settings
    from geventtcp.server.state import ServerState

__all__ = [
    "MAX_AUTH_FAILURES",
    "PREAUTH_MAX_LINE_BYTES",
    "is_loopback",
    "load_token",
    "is_protected",
    "check_listen_addresses",
    "check_metrics_addresses",
    "check_serving_settings",
    "make_auth",
]

log = logging.getLogger("geventtcp.server")

#: Wrong tokens tolerated on one connection; the last failure's reply is followed by a close.
MAX_AUTH_FAILURES = 3
# PREAUTH_MAX_LINE_BYTES, a wire fact, is defined in protocol.py and re-exported here.


def is_loopback(address: Any) -> bool:
    """True for a loopback IP peer/bind address, a unix-socket address, or an IPv4-mapped loopback."""
    if not isinstance(address, tuple):
        return True  # unix sockets: only local processes can connect
    host = address[0]
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return bool(host == "localhost")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_loopback)


def load_token(settings: Settings) -> str | None:
    """The shared secret from ``auth_token`` or ``auth_token_file``; ``None`` when auth is off.

    Raises :class:`ConfigError` when both are set, the file cannot be read, or the token is empty.
    """
    token = settings.auth_token
    path = settings.auth_token_file
    if token and path:
        raise ConfigError("set auth_token or auth_token_file, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read auth_token_file {path}: {exc}") from None
        if not token:
            raise ConfigError(f"auth_token_file {path} is empty")
    return token or None


def is_protected(settings: Settings, token: str | None) -> bool:
    """Protected mode is in force: enabled, and no token nor required client certificates guard us."""
    return settings.protected_mode and token is None and not settings.tls_require_client_cert


def check_listen_addresses(addresses: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` for the first non-loopback listen address (call only when protected)."""
    for address in addresses:
        if not is_loopback(address):
            host, port = address[0], address[1]
            raise ConfigError(
                f"protected mode: refusing to listen on {host}:{port} without authentication. Set auth_token "
                "(or auth_token_file), or require TLS client certificates, or pass --no-protected-mode "
                "(GEVENTTCP_PROTECTED_MODE=0) if every peer that can reach this address is trusted."
            )


def check_metrics_addresses(settings: Settings, addresses: Iterable[Any]) -> None:
    """Protected mode for the metrics listener: raise :class:`ConfigError` for a non-loopback address.

    The metrics endpoint has no authentication of its own (a token or client certificate guards
    the protocol, not scrapes), so only ``protected_mode`` off lets it listen beyond loopback.
    """
    if not settings.protected_mode:
        return
    for address in addresses:
        if not is_loopback(address):
            host, port = address[0], address[1]
            raise ConfigError(
                f"protected mode: refusing to serve metrics on {host}:{port}: the metrics endpoint has no "
                "authentication (auth_token does not cover it). Bind metrics_bind to a loopback address, or "
                "pass --no-protected-mode (GEVENTTCP_PROTECTED_MODE=0) if every peer that can reach it is trusted."
            )


def check_serving_settings(settings: Settings, addresses: Iterable[Any], metrics_addresses: Iterable[Any] = ()) -> None:
    """The checks every server start makes, for the launcher's preflight and ``serve --check-config``.

    Loads the auth token, builds the TLS server context (certificate files readable and matching)
    and, in protected mode, refuses non-loopback ``addresses`` (``getsockname()``-style tuples or
    unix paths) and ``metrics_addresses`` (see :func:`check_metrics_addresses`). Raises
    :class:`ConfigError` (or ``OSError``/``ssl.SSLError`` from the TLS files).
    """
    from geventtcp.tls import server_context_from_settings

    token = load_token(settings)
    server_context_from_settings(settings)
    if is_protected(settings, token):
        check_listen_addresses(addresses)
    check_metrics_addresses(settings, metrics_addresses)


def make_auth(state: ServerState[Any], token: str | None) -> Callable[[ServerRequest], Any]:
    """The AUTH builtin: ``params.token`` is compared in constant time with the configured secret.

    Success switches the connection to the full command table and line limit. A wrong or missing
    token is answered with 401; after :data:`MAX_AUTH_FAILURES` the connection is closed right after
    that reply, and no line after it is dispatched (lines pipelined behind it get no reply). The
    first failure of a connection is logged, every one is counted. With auth off, AUTH succeeds and
    says so (``required: false``).
    """
    expected = token.encode("utf-8") if token is not None else None

    def auth(request: ServerRequest) -> Any:
        conn = request.connection
        if expected is None:
            return {"authenticated": True, "required": False}
        given = request.params.get("token")
        if isinstance(given, str) and hmac.compare_digest(given.encode("utf-8"), expected):
            conn.authenticate()
            return {"authenticated": True, "required": True}
        conn.auth_failures += 1
        state.stats.auth_failures += 1
        if conn.auth_failures == 1:  # one line per connection: the rest are counted (auth_failures)
            log.warning("connection %r: authentication failed (closed after %d failures)", conn.address,
                        MAX_AUTH_FAILURES)
        if conn.auth_failures >= MAX_AUTH_FAILURES:
            # No line after this one is dispatched, even from the same read.
            conn.close_after_replies("auth_failed", f"authentication failed {MAX_AUTH_FAILURES} times")
        raise ServerRefusal("invalid credentials", Code.UNAUTHENTICATED)

    auth.idempotent = True  # type: ignore[attr-defined]
    return auth
