"""The master's listening sockets: shared by every worker, or one SO_REUSEPORT socket per worker slot.

When all workers accept from one shared socket, every new connection wakes every worker and the
first to call ``accept`` wins: an idle worker can be starved while a busy one takes a whole burst
(the thundering-herd imbalance gunicorn's gevent workers show). With ``reuse_port`` (opt-in, on
platforms that have it), the master binds one socket per TCP address *per worker slot*, all on the
same port; the kernel hashes each new connection to one socket of the group, so connections spread
evenly. A slot's socket outlives its worker: a replacement (after a crash, ``max_requests`` or a
HUP) inherits the same socket and accepts whatever queued meanwhile, so nothing is refused. The
price, and why it is not the default: the kernel hashes blindly, so a worker stuck in CPU work
strands every connection hashed to its socket until it recovers or the heartbeat kills it; and
closing a retired slot's socket (TTOU) resets connections still in its handshake unless
``net.ipv4.tcp_migrate_req`` is 1. A shared socket is served by whichever worker is free.
Unix sockets are always shared.
"""

from __future__ import annotations

import os
import socket

from geventtcp.sockets import create_listener, format_address, parse_address

__all__ = ["ListenerSet"]


def _plain(gsock: object) -> socket.socket:
    """The same descriptor as a plain socket: the master runs no gevent hub."""
    return socket.socket(gsock.family, gsock.type, fileno=gsock.detach())  # type: ignore[attr-defined]


def _claim(address: str) -> str:
    """Check that ``address`` is free with a plain bind (no listen), and make port 0 concrete.

    ``SO_REUSEPORT`` sockets of the same user may share a port, so without this a second server
    started by mistake on a busy port would silently take half its connections instead of failing
    with "address already in use".
    """
    family, addr = parse_address(address)
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)
        return format_address(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    finally:
        probe.close()


class ListenerSet:
    """Binds every ``bind`` address; :meth:`for_slot` gives the sockets a worker of that slot serves.

    Raises ``OSError`` (or :class:`geventtcp.ConfigError` for a malformed address) when binding
    fails. The master owns every socket here and closes them with :meth:`close`; workers get copies
    through ``fork``, which stay open in them until they stop accepting.
    """

    def __init__(self, binds: list[str], backlog: int, reuse_port: bool) -> None:
        self.backlog = backlog
        self.shared: list[socket.socket] = []
        self.slots: dict[int, list[socket.socket]] = {}
        self.slot_addresses: list[str] = []  # resolved (port 0 made concrete) TCP addresses
        self.unix_paths: list[str] = []
        self.bound: list[str] = []  # every address once, in bind order (port 0 made concrete)
        per_slot = reuse_port and hasattr(socket, "SO_REUSEPORT")
        try:
            for address in binds:
                family, addr = parse_address(address)
                if family == socket.AF_UNIX or not per_slot:
                    sock = _plain(create_listener(address, backlog))
                    self.shared.append(sock)
                    if family == socket.AF_UNIX:
                        self.unix_paths.append(addr)
                else:
                    sock = _plain(create_listener(_claim(address), backlog, reuse_port=True))
                    self.slots.setdefault(0, []).append(sock)
                    self.slot_addresses.append(format_address(sock))
                self.bound.append(format_address(sock))
        except BaseException:
            self.close()
            raise

    def for_slot(self, slot: int) -> list[socket.socket]:
        """The sockets of worker slot ``slot`` (binding its own group members the first time)."""
        if self.slot_addresses and slot not in self.slots:
            self.slots[slot] = [_plain(create_listener(address, self.backlog, reuse_port=True))
                                for address in self.slot_addresses]
        return self.shared + self.slots.get(slot, [])

    def close_slots_from(self, first: int) -> None:
        """Close the master's copies of slots ``first`` and above (their workers keep theirs while draining)."""
        for slot in [s for s in self.slots if s >= max(1, first)]:
            for sock in self.slots.pop(slot):
                sock.close()

    def all(self) -> list[socket.socket]:
        return self.shared + [sock for socks in self.slots.values() for sock in socks]

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        self.shared, self.slots = [], {}

    def unlink(self) -> None:
        """Remove the unix socket files (at exit)."""
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
