"""TLS contexts for both sides, built on the standard ``ssl`` module (gevent's cooperative flavour)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from gevent import Timeout
from gevent import ssl as gssl

from geventtcp.errors import ConfigError

if TYPE_CHECKING:
    from geventtcp.config import Settings

__all__ = ["server_context", "client_context", "server_context_from_settings", "handshake", "peer_certificate"]


def server_context(
    certfile: str, keyfile: str | None = None, ca_certs: str | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A server context: TLS 1.2+, our certificate, and (with ``ca_certs``) client-certificate checks.

    ``require_client_cert`` refuses clients without a certificate signed by ``ca_certs``; without
    it a certificate is verified only when the client offers one. Raises :class:`ConfigError` when a
    file cannot be loaded, so a misconfigured server fails at start-up, not at the first client.
    """
    ctx: ssl.SSLContext = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile or None)
        if ca_certs:
            ctx.load_verify_locations(cafile=ca_certs)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files ({certfile}, {keyfile or '-'}, {ca_certs or '-'}): {exc}") from None
    if require_client_cert:
        if not ca_certs:
            raise ConfigError("tls_require_client_cert needs ca_certs to verify client certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca_certs:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def server_context_from_settings(settings: Settings) -> ssl.SSLContext | None:
    """The server context the ``certfile``/``keyfile``/``ca_certs`` settings describe, or ``None``."""
    if not settings.certfile:
        if settings.keyfile or settings.tls_require_client_cert:
            raise ConfigError("keyfile and tls_require_client_cert need certfile (TLS is off without it)")
        return None
    return server_context(settings.certfile, settings.keyfile, settings.ca_certs, settings.tls_require_client_cert)


def client_context(
    ca_certs: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    verify: bool = True,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context that verifies the server by default (system CAs, or ``ca_certs``).

    ``certfile``/``keyfile`` present a client certificate (mutual TLS). ``verify=False`` turns all
    checks off and exists for tests against throwaway certificates only.
    """
    ctx: ssl.SSLContext = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca_certs:
            ctx.load_verify_locations(cafile=ca_certs)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if certfile:
            ctx.load_cert_chain(certfile, keyfile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files ({ca_certs or '-'}, {certfile or '-'}): {exc}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = check_hostname
    return ctx


def handshake(ctx: ssl.SSLContext, sock: Any, timeout: float, server_side: bool = True,
              server_hostname: str | None = None) -> Any:
    """Wrap ``sock`` and finish the handshake within ``timeout`` seconds; returns the TLS socket.

    On any failure (timeout, bad certificate, plaintext peer) the socket is closed and the error
    (``ssl.SSLError``, ``OSError`` or ``TimeoutError``) is raised: a silent peer can hold a greenlet
    no longer than ``timeout``.
    """
    try:
        tls = ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                              server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    try:
        with Timeout(timeout, TimeoutError(f"TLS handshake not finished within {timeout:g}s")):
            tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


def peer_certificate(sock: Any) -> Any:
    """``sock.getpeercert()`` of a TLS socket (a dict; ``{}`` when the peer's certificate was not
    verified), ``None`` for a plain socket or one already closed (whose certificate is gone with it)."""
    getpeercert = getattr(sock, "getpeercert", None)  # only an SSL socket has it
    if getpeercert is None:
        return None
    try:
        return getpeercert()
    except (AttributeError, ValueError, OSError):  # closed, shut down ("handshake not done yet"), not connected
        return None
