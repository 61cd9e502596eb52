#!/usr/bin/env python3
"""Run the geventtcp conformance vectors against a server: ``python conformance/run.py HOST:PORT``.

The vectors (``vectors.json`` next to this file) are the protocol's rules written as data: request
lines to send and the reply lines a conforming server answers, as patterns. They are language
neutral; this runner is one implementation of how to play them (standard library only, so a
third party needs nothing but Python 3.10+ to check its own server). The file's ``matching`` entry
states the pattern rules; ``README.md`` here says how to run them and what the conformance
application must serve.

Each group of cases names the server settings it needs (``"server"``); the runner plays only the
groups whose settings you say the server was started with (``--settings``), so one server run
covers the default groups and a test harness starts one server per group (as our tests do).
Exit status: 0 when every case played passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_VECTORS = HERE / "vectors.json"
PING = b'{"cmdid":-1,"timestamp":0,"id":"conformance-ping"}\n'


class Mismatch(AssertionError):
    """A reply (or the connection) did not do what the case expects."""


# -- patterns ------------------------------------------------------------------------------------

_TYPES = {
    "integer": lambda v: type(v) is int,
    "string": lambda v: type(v) is str,
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "null": lambda v: v is None,
    "boolean": lambda v: type(v) is bool,
    "number": lambda v: type(v) in (int, float),
}


def match(pattern: Any, value: Any, path: str = "$") -> None:
    """Raise :class:`Mismatch` unless ``value`` matches ``pattern`` (the rules in vectors.json)."""
    if type(pattern) is dict and pattern and all(key.startswith("$") for key in pattern):
        _match_operator(pattern, value, path)
    elif type(pattern) is dict:
        if type(value) is not dict:
            raise Mismatch(f"{path}: expected an object, got {value!r}")
        for key, sub in pattern.items():
            if type(sub) is dict and sub.get("$absent"):
                if key in value:
                    raise Mismatch(f"{path}.{key}: expected absent, got {value[key]!r}")
                continue
            if key not in value:
                raise Mismatch(f"{path}.{key}: missing")
            match(sub, value[key], f"{path}.{key}")
    elif type(pattern) is list:
        if type(value) is not list or len(value) != len(pattern):
            raise Mismatch(f"{path}: expected {pattern!r}, got {value!r}")
        for index, (sub, item) in enumerate(zip(pattern, value, strict=True)):
            match(sub, item, f"{path}[{index}]")
    elif type(pattern) is not type(value) or pattern != value:  # 1 is not true, nor 1.0
        raise Mismatch(f"{path}: expected {pattern!r}, got {value!r}")


def _match_operator(pattern: dict[str, Any], value: Any, path: str) -> None:
    if "$type" in pattern and not _TYPES[pattern["$type"]](value):
        raise Mismatch(f"{path}: expected a {pattern['$type']}, got {value!r}")
    if "$regex" in pattern and not (type(value) is str and re.search(pattern["$regex"], value)):
        raise Mismatch(f"{path}: expected text matching {pattern['$regex']!r}, got {value!r}")
    if "$oneof" in pattern and not any(_matches(option, value) for option in pattern["$oneof"]):
        raise Mismatch(f"{path}: expected one of {pattern['$oneof']!r}, got {value!r}")
    if "$keys" in pattern and (type(value) is not dict or sorted(value) != sorted(pattern["$keys"])):
        raise Mismatch(f"{path}: expected exactly the keys {pattern['$keys']}, got {value!r}")


def _matches(pattern: Any, value: Any) -> bool:
    try:
        match(pattern, value)
    except Mismatch:
        return False
    return True


# -- playing a case ------------------------------------------------------------------------------


class Wire:
    """One connection to the server under test, reading reply lines with a deadline."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.timeout = timeout
        self.pending = b""

    def send(self, item: Any) -> None:
        if type(item) is str:
            self.sock.sendall(item.encode("utf-8"))
        elif "hex" in item:
            self.sock.sendall(bytes.fromhex(item["hex"]))
        elif "repeat" in item:
            self.sock.sendall(item["repeat"].encode("utf-8") * item["times"])
        elif item.get("shutdown") == "write":
            self.sock.shutdown(socket.SHUT_WR)
        elif "pause_ms" in item:
            time.sleep(item["pause_ms"] / 1000.0)
        else:
            raise ValueError(f"unknown send item {item!r}")

    def line(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise Mismatch(f"no reply line within {self.timeout:g}s") from None
            if not data:
                raise Mismatch("connection closed while a reply line was expected")
            self.pending += data
        line, _, self.pending = self.pending.partition(b"\n")
        return line

    def expect_closed(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if self.pending:
                raise Mismatch(f"expected the connection to close, got {self.pending[:200]!r}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise Mismatch(f"connection still open after {self.timeout:g}s") from None
            except ConnectionResetError:
                return
            if not data:
                return
            self.pending += data

    def close(self) -> None:
        self.sock.close()


def check_line(expected: Any, line: bytes) -> None:
    """One reply line against one expectation: a pattern (object), or ``{"bytes": "..."}`` exactly."""
    if type(expected) is dict and "$bytes" in expected:
        if line + b"\n" != expected["$bytes"].encode("utf-8"):
            raise Mismatch(f"expected the line {expected['$bytes']!r}, got {line!r}")
        return
    if any(byte > 127 for byte in line):
        raise Mismatch(f"reply line is not pure ASCII: {line[:200]!r}")
    try:
        reply = json.loads(line)
    except ValueError:
        raise Mismatch(f"reply line is not JSON: {line[:200]!r}") from None
    match(expected, reply)


def play(case: dict[str, Any], address: tuple[str, int], timeout: float) -> None:
    """Play one case; raise :class:`Mismatch` on the first difference."""
    wire = Wire(address, timeout)
    try:
        for item in case["send"]:
            wire.send(item)
        for index, expected in enumerate(case.get("expect", [])):
            try:
                check_line(expected, wire.line())
            except Mismatch as exc:
                raise Mismatch(f"reply {index + 1}: {exc}") from None
        unordered = case.get("expect_any_order", [])
        lines = [wire.line() for _ in unordered]
        for expected in unordered:
            found = next((line for line in lines if _line_matches(expected, line)), None)
            if found is None:
                raise Mismatch(f"no reply among {lines!r} matches {expected!r}")
            lines.remove(found)
        if case.get("then", "open") == "closed":
            wire.expect_closed()
        else:
            wire.sock.sendall(PING)
            try:
                check_line({"code": 0, "id": "conformance-ping"}, wire.line())
            except Mismatch as exc:
                raise Mismatch(f"connection not usable after the case: {exc}") from None
    finally:
        wire.close()


def _line_matches(expected: Any, line: bytes) -> bool:
    try:
        check_line(expected, line)
    except Mismatch:
        return False
    return True


# -- the command line ----------------------------------------------------------------------------


def selected(vectors: dict[str, Any], settings: dict[str, Any], groups: list[str]) -> list[dict[str, Any]]:
    """The groups to play: named ones, else those whose ``server`` settings equal ``settings``."""
    if groups:
        return [group for group in vectors["groups"] if group["name"] in groups]
    return [group for group in vectors["groups"] if group.get("server", {}) == settings]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of the server under test")
    parser.add_argument("--vectors", type=Path, default=DEFAULT_VECTORS)
    parser.add_argument("--settings", default="{}",
                        help="JSON object: the server settings the server was started with (default {})")
    parser.add_argument("--group", action="append", default=[], help="play only this group (repeatable)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply line")
    parser.add_argument("--json", action="store_true", help="print results as one JSON object")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    address = (host.strip("[]") or "127.0.0.1", int(port))
    vectors = json.loads(args.vectors.read_text(encoding="utf-8"))
    results = []
    for group in selected(vectors, json.loads(args.settings), args.group):
        for case in group["cases"]:
            try:
                play(case, address, args.timeout)
                error = None
            except (Mismatch, OSError) as exc:
                error = str(exc) or type(exc).__name__
            results.append({"group": group["name"], "case": case["name"], "rule": case.get("rule", ""),
                            "passed": error is None, "error": error})
    failed = [result for result in results if not result["passed"]]
    if args.json:
        print(json.dumps({"played": len(results), "failed": len(failed), "results": results}, indent=1))
    else:
        for result in results:
            status = "PASS" if result["passed"] else "FAIL"
            print(f"{status} {result['group']}/{result['case']}" + (f": {result['error']}" if result["error"] else ""))
        print(f"{len(results) - len(failed)} of {len(results)} passed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
