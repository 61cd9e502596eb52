"""The PROXY protocol (HAProxy's ``send-proxy`` v1 text and ``send-proxy-v2`` binary header), sans I/O.

A proxy that balances TCP connections (HAProxy in ``mode tcp``) opens every server connection from
its own address; the PROXY header it sends first tells the server the real client's address, so
per-peer limits, protected mode and logs see the client instead of the proxy. This module only
parses bytes: :func:`parse` returns ``None`` while the header is incomplete, a
:class:`ProxyHeader` once it is whole (its ``length`` says how many bytes it took; what follows is
the client's own data), and raises :class:`ProxyHeaderError` for anything malformed. Who may send a
header is the server's decision (``proxy_allow_from``); reading with a timeout is
:func:`geventtcp.server.Server._read_proxy_header`'s.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt. A v1 line is at most 107 bytes
(CRLF included); a v2 header is 16 bytes plus a length field, bounded here by :data:`MAX_HEADER_BYTES`
(TLVs after the addresses are skipped).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["ProxyHeader", "ProxyHeaderError", "parse", "build_v1", "build_v2", "is_trusted", "trusted_networks",
           "V2_SIGNATURE", "MAX_V1_BYTES", "MAX_HEADER_BYTES"]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 line, "\r\n" included (the spec's bound: "PROXY UNKNOWN" with two IPv6 addresses).
MAX_V1_BYTES = 107
#: Longest v2 header accepted: 16 fixed bytes, addresses (at most 216 for AF_UNIX) and some TLVs.
#: HAProxy's own TLVs (unique-id, ssl, authority) fit; a peer claiming more is refused.
MAX_HEADER_BYTES = 16 + 1024

_V2_FIXED = 16
# Address block sizes by the family nibble of a v2 header: AF_INET, AF_INET6, AF_UNIX.
_V2_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}
_V2_LOCAL, _V2_PROXY = 0x0, 0x1


class ProxyHeaderError(ValueError):
    """The bytes are not a well-formed PROXY header; the connection must be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header: ``source``/``destination`` are socket-style address tuples, or ``None`` when
    the header carries no usable address (v2 LOCAL: the proxy's own health check; v1 UNKNOWN; an
    UNSPEC or AF_UNIX family), in which case the socket's own peer address stands."""

    version: int
    length: int
    source: tuple[Any, ...] | None = None
    destination: tuple[Any, ...] | None = None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; ``None`` if more bytes are needed; raises ProxyHeaderError."""
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            raise ProxyHeaderError("bad PROXY v2 signature")
        return _parse_v2(data) if len(data) >= _V2_FIXED else None
    if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        raise ProxyHeaderError("no PROXY header (neither v1 'PROXY ' nor the v2 signature)")
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_BYTES)
    if end < 0:
        if len(data) >= MAX_V1_BYTES or b"\n" in data[:MAX_V1_BYTES]:
            raise ProxyHeaderError(f"PROXY v1 line not ended by CRLF within {MAX_V1_BYTES} bytes")
        return None
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    length = end + 2
    if fields[1:2] == ["UNKNOWN"]:
        return ProxyHeader(1, length)  # the proxy does not know the client (the rest is ignored)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line must be 'PROXY TCP4|TCP6 SRC DST SPORT DPORT' or 'PROXY UNKNOWN'")
    version = 4 if fields[1] == "TCP4" else 6
    src, dst = _v1_ip(fields[2], version), _v1_ip(fields[3], version)
    sport, dport = _v1_port(fields[4]), _v1_port(fields[5])
    return ProxyHeader(1, length, _address(src, sport, version), _address(dst, dport, version))


def _v1_ip(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: bad address {text[:40]!r}") from None
    if ip.version != version:
        raise ProxyHeaderError(f"PROXY v1: {text!r} is not an IPv{version} address")
    return str(ip)


def _v1_port(text: str) -> int:
    # Decimal digits only (int() would also take "+1", " 1" or "1_0"), no leading zero, 0..65535.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1: bad port {text[:10]!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    ver_cmd, fam, size = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"PROXY v2: unknown command {command}")
    family, transport = fam >> 4, fam & 0xF
    if family > 0x3 or transport > 0x2:
        raise ProxyHeaderError(f"PROXY v2: unknown address family/transport 0x{fam:02x}")
    length = _V2_FIXED + size
    if length > MAX_HEADER_BYTES:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    need = _V2_ADDRESS_BYTES.get(family, 0)
    if size < need:
        raise ProxyHeaderError(f"PROXY v2: {size} address bytes, family 0x{family:x} needs {need}")
    if len(data) < length:
        return None
    if command == _V2_LOCAL or family not in (0x1, 0x2):
        return ProxyHeader(2, length)  # LOCAL (health check), UNSPEC or AF_UNIX: keep the socket's address
    if transport != 0x1:
        raise ProxyHeaderError("PROXY v2: the connection is not a stream (transport must be STREAM)")
    if family == 0x1:
        src4, dst4 = ipaddress.IPv4Address(data[16:20]), ipaddress.IPv4Address(data[20:24])
        sport, dport = struct.unpack_from("!HH", data, 24)
        return ProxyHeader(2, length, _address(str(src4), sport, 4), _address(str(dst4), dport, 4))
    src6, dst6 = ipaddress.IPv6Address(data[16:32]), ipaddress.IPv6Address(data[32:48])
    sport, dport = struct.unpack_from("!HH", data, 48)
    return ProxyHeader(2, length, _address(str(src6), sport, 6), _address(str(dst6), dport, 6))


def _address(ip: str, port: int, version: int) -> tuple[Any, ...]:
    """The tuple ``socket.getpeername()`` would give: (host, port), or (host, port, 0, 0) for IPv6."""
    return (ip, port) if version == 4 else (ip, port, 0, 0)


def build_v1(source: tuple[Any, ...] | None, destination: tuple[Any, ...] | None = None) -> bytes:
    """A v1 line (for tests and tools); ``source=None`` gives ``PROXY UNKNOWN``."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    dst = destination or (("::1", 0) if ":" in source[0] else ("127.0.0.1", 0))
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {dst[0]} {source[1]} {dst[1]}\r\n".encode("ascii")


def build_v2(source: tuple[Any, ...] | None, destination: tuple[Any, ...] | None = None, tlvs: bytes = b"") -> bytes:
    """A v2 header (for tests and tools); ``source=None`` gives a LOCAL command (a health check)."""
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    ip = ipaddress.ip_address(source[0])
    dst_ip = ipaddress.ip_address(destination[0] if destination else ("127.0.0.1" if ip.version == 4 else "::1"))
    dport = destination[1] if destination else 0
    body = ip.packed + dst_ip.packed + struct.pack("!HH", source[1], dport) + tlvs
    fam = 0x11 if ip.version == 4 else 0x21
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None


def trusted_networks(entries: list[str]) -> Networks:
    """The ``proxy_allow_from`` entries as networks; ``None`` means any peer (``*``)."""
    if "*" in entries:
        return None
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def is_trusted(address: Any, networks: Networks) -> bool:
    """May the peer at ``address`` (a socket peer address) send a PROXY header? Unix peers may."""
    if networks is None or not isinstance(address, tuple):
        return True
    try:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)
