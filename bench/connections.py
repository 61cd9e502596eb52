"""Idle memory per connection and many concurrent connections, for our server and the reference peers.

    python bench/connections.py memory [--connections 5000] [--servers project,raw_gevent,...]
    python bench/connections.py concurrent [--connections 10000]

``memory``: start each server, open N connections, send one request on each and read its reply,
then let them sit idle; the growth of the serving process's RSS divided by N is the memory one
idle connection costs (the issue's measure). ``concurrent``: N connections open at once on one
worker of our server, every one sends a request, every reply must come back.

Connections come from many loopback source addresses (127.0.x.y) so the server's default
per-peer limit (max_connections_per_peer) applies as it would to N real clients. Peers run from
the virtualenv compare.sh creates (PEERS_VENV, default /tmp/geventtcp-peers-venv). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time

from benchutil import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_DIR = os.environ.get("PEERS_DIR", os.path.join(ROOT, "..", "shared", "bench", "peers"))
PEERS_VENV = os.environ.get("PEERS_VENV", "/tmp/geventtcp-peers-venv")
PEERS = ("raw_gevent", "gevent_naive", "tornado_seed", "asyncio_uvloop")
REQUEST = b'{"cmdid":1,"timestamp":0,"params":{"content":"Hello world!"}}\n'
PER_SOURCE = 200  # connections per loopback source address (below the default per-peer limit of 256)


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for row in fh:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """A server subprocess; ``pid`` is the process that holds the connections (our worker, or the peer)."""

    def __init__(self, name: str, port: int, extra: list[str]) -> None:
        self.name = name
        self.log = open(f"/tmp/geventtcp-bench-{name}-{port}.log", "w+")  # noqa: SIM115 - closed in stop()
        if name == "project":
            argv = [sys.executable, "-m", "geventtcp", "serve", "handlers", "--bind", f"127.0.0.1:{port}", *extra]
        else:
            argv = [os.path.join(PEERS_VENV, "bin", "python"), os.path.join(PEERS_DIR, f"{name}.py"), str(port)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=lambda: raise_fd_limit(65536))
        wait_port(port)
        self.pid = self.proc.pid
        if name == "project":  # the worker that serves, not the master
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                self.log.seek(0)
                found = re.findall(r"listening on \S+ \(pid (\d+)\)", self.log.read())
                if found:
                    self.pid = int(found[-1])
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def answered_ok(line: bytes) -> bool:
    try:
        return bool(json.loads(line)["code"] == 0)
    except (ValueError, KeyError, TypeError):
        return False


def open_connections(port: int, n: int) -> list[socket.socket]:
    """Open ``n`` connections from 127.0.x.y sources, send one request on each, read each reply."""
    socks = []
    for i in range(n):
        source = f"127.0.{1 + i // PER_SOURCE // 250}.{1 + (i // PER_SOURCE) % 250}"
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    for sock in socks:
        sock.sendall(REQUEST)
    answered = 0
    for sock in socks:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        if answered_ok(buf):
            answered += 1
    if answered != n:
        raise RuntimeError(f"only {answered} of {n} connections were answered")
    return socks


def measure_memory(name: str, n: int, extra: list[str]) -> float:
    port = free_port()
    server = ServerProcess(name, port, extra)
    try:
        warm = open_connections(port, 50)  # first-use allocations (code paths, buffers) out of the way
        for sock in warm:
            sock.close()
        time.sleep(0.5)
        before = rss_kb(server.pid)
        socks = open_connections(port, n)
        time.sleep(1.0)
        after = rss_kb(server.pid)
        for sock in socks:
            sock.close()
        return (after - before) * 1024 / n / 1000  # KB (10^3) per connection, as the issue quotes
    finally:
        server.stop()


def cmd_memory(args: argparse.Namespace) -> int:
    rows = []
    for name in args.servers.split(","):
        extra = ["--codec", "orjson"] if name == "project-orjson" else []
        kb = measure_memory("project" if name.startswith("project") else name, args.connections, extra)
        rows.append((name, kb))
        print(f"{name:16s} {kb:6.2f} KB per idle connection", file=sys.stderr)
    print(f"\nIdle memory: {args.connections} connections, each answered once, then idle (server RSS growth)\n")
    print("| server | KB per connection |\n|---|---|")
    for name, kb in rows:
        print(f"| {name} | {kb:.1f} |")
    return 0


def cmd_concurrent(args: argparse.Namespace) -> int:
    port = free_port()
    server = ServerProcess("project", port, [])
    try:
        before = rss_kb(server.pid)
        start = time.monotonic()
        socks = open_connections(port, args.connections)
        elapsed = time.monotonic() - start
        during = rss_kb(server.pid)
        for sock in socks:  # every connection still works after all were opened
            sock.sendall(REQUEST)
        again = sum(1 for sock in socks if answered_ok(sock.recv(4096)))
        for sock in socks:
            sock.close()
    finally:
        server.stop()
    print(f"\n{args.connections} concurrent connections on one worker (default settings)\n")
    print("| connections | answered (first / second request) | seconds to open and answer all | "
          "worker RSS MB before / with all open |\n|---|---|---|---|")
    print(f"| {args.connections} | {args.connections} / {again} | {elapsed:.2f} | "
          f"{before / 1024:.1f} / {during / 1024:.1f} |")
    return 0 if again == args.connections else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory", help="idle memory per connection, ours and the peers")
    mem.add_argument("--connections", type=int, default=5000)
    mem.add_argument("--servers", default="project," + ",".join(PEERS))
    conc = sub.add_parser("concurrent", help="N concurrent connections on one worker, all answered")
    conc.add_argument("--connections", type=int, default=10000)
    args = parser.parse_args()
    raise_fd_limit(args.connections + 1000)
    return cmd_memory(args) if args.what == "memory" else cmd_concurrent(args)


if __name__ == "__main__":
    sys.exit(main())
