"""Raw clients of the wire protocol: ``RawConn`` (byte-exact), ``call_once``, ``Caller`` (a pooled
client's one-request-at-a-time behaviour, goaway resends), and ``rst`` (close with a reset)."""

from __future__ import annotations

import json
import socket as stdsocket
import ssl
import struct
import time
from typing import Any

from gevent import socket

__all__ = ["RawConn", "call_once", "Caller", "rst"]


class RawConn:
    """A byte-exact client of the wire protocol: write what you like, read reply lines, observe EOF.

    ``address`` is a (host, port) tuple or a unix-socket path; ``source`` binds the local address
    first (another loopback IP). Every read waits at most ``timeout`` seconds (``socket.timeout``).
    """

    def __init__(self, address: Any, source: str | None = None, timeout: float = 5.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buf = b""
        self.timeout = timeout

    @classmethod
    def tls(cls, address: Any, ctx: Any, hostname: str = "localhost", timeout: float = 5.0) -> RawConn:
        """Connect and finish a TLS handshake (raises ssl.SSLError/OSError when it fails)."""
        from geventtcp.tls import handshake

        conn = cls(address, timeout=timeout)
        conn.sock = handshake(ctx, conn.sock, timeout, server_side=False, server_hostname=hostname)
        conn.sock.settimeout(timeout)
        return conn

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, cmdid: int, params: Any = None, **fields: Any) -> None:
        body = {"cmdid": cmdid, "params": params or {}, **fields}
        self.send(json.dumps(body).encode() + b"\n")

    def readline(self, timeout: float | None = None) -> bytes:
        """One line including its newline; what is left (b"" or a partial line) on EOF."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def raw_line(self, timeout: float | None = None) -> bytes:
        """The next line without its newline; ``EOFError`` if the server closed first."""
        line = self.readline(timeout)
        if not line.endswith(b"\n"):
            raise EOFError(f"connection closed; {len(line)} bytes unread")
        return line[:-1]

    def line(self, timeout: float | None = None) -> dict[str, Any]:
        """The next line as a reply object; ``EOFError`` if the server closed first."""
        reply = json.loads(self.raw_line(timeout))
        assert isinstance(reply, dict), reply
        return reply

    def call(self, request: int | dict[str, Any] | bytes, params: Any = None, **fields: Any) -> dict[str, Any]:
        """Send a request (a cmdid with params and fields, an object, or raw bytes); its reply line."""
        if isinstance(request, int):
            self.request(request, params, **fields)
        else:
            self.send(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")
        return self.line()

    def at_eof(self) -> bool:
        """True when the next read finds the connection closed (no further line)."""
        return self.readline() == b""

    def expect_eof(self, timeout: float = 5.0) -> None:
        """Wait until the server closes the connection (lines still unread are kept in ``buf``).

        Returns on EOF or reset; ``socket.timeout`` if the connection is still open after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return
            if not chunk:
                return
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def call_once(address: Any, cmdid: int, params: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """One request on a fresh connection; the reply's data (OSError on goaway or EOF, ValueError on error)."""
    with RawConn(address, timeout=timeout) as conn:
        conn.request(cmdid, params, id=1)
        line = conn.readline()
    if not line.endswith(b"\n"):
        raise ConnectionError("closed before a reply")
    reply = json.loads(line)  # a goaway may follow the reply
    if reply.get("goaway"):
        raise ConnectionError(f"goaway {reply['goaway']}")
    if reply["code"]:
        raise ValueError(reply)
    return reply["data"]


class Caller:
    """A client with one persistent connection and one request at a time, as a pooled client has.

    ``call`` returns the reply. A goaway (the server read nothing more) makes it reconnect and resend;
    an EOF after sending raises :class:`MaybeExecutedError`; a refused connect is counted in ``refused``,
    a connect reset in ``reset_at_connect`` (both re-raised).
    """

    class MaybeExecutedError(Exception):
        pass

    def __init__(self, address: Any, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self.conn: RawConn | None = None
        self.refused = 0
        self.reset_at_connect = 0
        self.goaways: list[str] = []
        self.resent = 0

    def _connect(self) -> RawConn:
        try:
            self.conn = RawConn(self.address, timeout=self.timeout)
        except ConnectionRefusedError:
            self.refused += 1
            raise
        except ConnectionResetError:  # reset in the handshake (its listener closed): nothing was sent
            self.reset_at_connect += 1
            raise
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, cmdid: int, params: dict[str, Any] | None = None, request_id: int = 0) -> dict[str, Any]:
        line = json.dumps({"cmdid": cmdid, "id": request_id, "params": params or {}}).encode() + b"\n"
        for _attempt in range(20):
            conn = self.conn if self.conn is not None else self._connect()
            try:
                conn.send(line)
                reply_line = conn.readline()
            except ConnectionResetError as exc:
                self.close()
                raise self.MaybeExecutedError(f"connection reset after sending: {exc}") from None
            if not reply_line.endswith(b"\n"):
                self.close()
                raise self.MaybeExecutedError("EOF after sending, without a goaway")
            reply: dict[str, Any] = json.loads(reply_line)
            if reply.get("goaway"):
                self.goaways.append(reply["goaway"])
                self.resent += 1
                self.close()
                continue
            return reply
        raise AssertionError("20 goaways in a row")


def rst(sock: Any) -> None:
    """Close with RST instead of FIN (SO_LINGER 0), as a crashed peer or a middlebox does."""
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
