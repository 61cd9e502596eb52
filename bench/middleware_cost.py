"""What middleware and a concurrency limit add to one request, measured on the composed call alone.

    python bench/middleware_cost.py                  # ns per call, a tight timed loop in-process
    python bench/middleware_cost.py --callgrind      # instructions per call, under valgrind callgrind

Each variant is the cmdid 1 call :func:`geventtcp.middleware.build_calls` composes (what the server
dispatches to), called with one ``Request``: the bare echo handler, one no-op middleware, one no-op
middleware from the server-level list plus one from the registry, ``max_concurrency``, and one
Flask ``teardown_request`` hook. The rest of the request path does not change with middleware, so
the difference to ``bare`` is the whole cost (docs/performance.md#middleware-cost). With
``--callgrind`` each variant runs in its own valgrind process twice (N and 2N calls) and the
difference of the two totals, over N, is the instructions per call, startup cancelled out.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import timeit
from typing import Any

from geventtcp.middleware import Call, build_calls
from geventtcp.protocol import Request
from geventtcp.urls import Registry


def echo(request: Request) -> Any:
    return request.params


def noop(request: Request, call_next: Call) -> Any:
    return call_next(request)


def teardown(request: Request, exc: BaseException | None) -> None:
    pass


def _variant(name: str) -> Call:
    reg = Registry()
    server_list: list[Any] = []
    if name == "limit":
        reg.add(1, echo, max_concurrency=100)
    else:
        reg.add(1, echo)
    if name in ("one", "two"):
        reg.middleware(noop)
    if name == "two":
        server_list.append(noop)
    if name == "teardown":
        reg.teardown_request(teardown)
    return build_calls(reg, server_list)[1]


VARIANTS = ("bare", "one", "two", "limit", "teardown")


def _run(name: str, n: int) -> None:
    call = _variant(name)
    request = Request(None, b"", 1, {"content": "Hello world!"}, 0)
    for _ in range(n):
        call(request)


def _instructions(name: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                        "--run", name, str(n)], check=True, capture_output=True)
        with open(out) as f:
            return int(re.search(r"^summary: (\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--run", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=20000)
    args = parser.parse_args()
    if args.run:
        _run(args.run[0], int(args.run[1]))
        return
    results: dict[str, float] = {}
    for name in VARIANTS:
        if args.callgrind:
            results[name] = (_instructions(name, 2 * args.n) - _instructions(name, args.n)) / args.n
        else:
            timer = functools.partial(_variant(name), Request(None, b"", 1, {"content": "Hello world!"}, 0))
            results[name] = min(timeit.repeat(timer, number=200_000, repeat=7)) / 200_000 * 1e9
    unit = "instructions" if args.callgrind else "ns"
    print(f"| variant | {unit} per call | added |\n|---|---:|---:|")
    for name in VARIANTS:
        print(f"| {name} | {results[name]:,.0f} | {results[name] - results['bare']:+,.0f} |")


if __name__ == "__main__":
    main()
