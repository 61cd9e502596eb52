"""Listening sockets: parse ``HOST:PORT`` / ``[IPv6]:PORT`` / ``unix:PATH`` and bind them."""

from __future__ import annotations

import os
import socket as _stdsocket
from typing import Any

from gevent import Timeout, socket

from geventtcp.errors import ConfigError

__all__ = ["parse_address", "create_listener", "format_address", "linger", "send_and_linger", "unsent_bytes",
           "LINGER_SECONDS"]


def parse_address(text: str, default_port: int = 8889) -> tuple[int, Any]:
    """Return ``(family, address)`` for a bind or connect string; :class:`ConfigError` if malformed."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"empty unix socket path in {text!r}")
        return socket.AF_UNIX, path
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"unterminated IPv6 address in {text!r}")
        port_text = rest.lstrip(":") or str(default_port)
        family = socket.AF_INET6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, str(default_port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port in address {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in address {text!r}")
    return family, (host or "0.0.0.0", port)


def create_listener(address: str, backlog: int = 2048, reuse_port: bool = False) -> Any:
    """Bind and listen on ``address``; the caller owns (and closes) the returned gevent socket.

    TCP listeners get ``TCP_NODELAY`` (accepted sockets inherit it on Linux): replies are small
    and must not wait for Nagle's algorithm. ``reuse_port`` sets ``SO_REUSEPORT`` (TCP only), so that
    several sockets can listen on one port and the kernel spreads new connections over them.
    """
    family, addr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            if os.path.exists(addr) and _is_socket(addr):
                os.unlink(addr)  # a stale socket file from a previous run
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def format_address(sock: Any) -> str:
    """The bound address of a listener as a bind string (``host:port`` or ``unix:path``)."""
    name = sock.getsockname()
    if sock.family == _stdsocket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == _stdsocket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


#: Longest wait for the peer's EOF after our half-close, before closing anyway.
LINGER_SECONDS = 1.0


def linger(sock: Any, seconds: float = LINGER_SECONDS) -> None:
    """Half-close ``sock``, then read and drop what the peer still sends until EOF or ``seconds``.

    Closing a socket with unread input makes the kernel send RST, which can destroy the last lines
    the peer has not read yet (nginx's lingering_close). I/O errors end the wait quietly; the
    caller still owns the socket and closes it.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        with Timeout(seconds, False):
            while sock.recv(65536):
                pass
    except OSError:
        pass


def send_and_linger(sock: Any, line: bytes) -> None:
    """Send a final ``line``, linger (see :func:`linger`), close: for peers refused or sent away."""
    try:
        sock.sendall(line)
        linger(sock)
    except OSError:
        pass
    finally:
        sock.close()


def unsent_bytes(sock: Any) -> int:
    """Bytes written to ``sock`` that the peer has not acknowledged yet (Linux SIOCOUTQ); -1 if unknown."""
    import fcntl
    import termios

    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return -1
    return int.from_bytes(buf, "little", signed=True)
