"""The cost of typed params (``params=``) per request, for each schema kind; prints a Markdown table.

    python bench/params_bench.py                 # microseconds (best of 5 timing runs; needs pydantic)
    python bench/params_bench.py --callgrind     # instructions under valgrind: load-independent

One realistic params object (6 fields, one of them a nested object of 3) is validated by a
dataclass, a TypedDict and a pydantic v2 model of the same shape. Two measurements per kind:

* ``validate``: ``ParamsSchema.validate(params)`` alone, in a tight loop;
* ``request``: a whole request through a real Server over a loopback socket (200 pipelined echo
  requests per write, read back), with the command registered with that schema and without one
  (``none``): the difference is what ``params=`` adds to a request.

With ``--callgrind`` each figure is the difference of two valgrind runs (N and 2N iterations)
divided by N, so start-up and import costs cancel and the machine's load does not matter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import timeit
from typing import Any, NotRequired, TypedDict

PARAMS = {"customer": 42, "sku": "A-1001", "qty": 3, "price": 19.99, "note": "leave at the door",
          "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345"}}
KINDS = ["none", "dataclass", "typeddict", "pydantic"]
BATCH = 200


@dataclasses.dataclass
class Address:
    street: str
    city: str
    zip: str


@dataclasses.dataclass
class Order:
    customer: int
    sku: str
    qty: int
    price: float
    address: Address
    note: str | None = None


class AddressDict(TypedDict):
    street: str
    city: str
    zip: str


class OrderDict(TypedDict):
    customer: int
    sku: str
    qty: int
    price: float
    address: AddressDict
    note: NotRequired[str | None]


def schema_class(kind: str) -> Any:
    if kind == "dataclass":
        return Order
    if kind == "typeddict":
        return OrderDict
    if kind == "pydantic":
        import pydantic

        class AddressModel(pydantic.BaseModel):
            street: str
            city: str
            zip: str

        class OrderModel(pydantic.BaseModel):
            customer: pydantic.StrictInt
            sku: str
            qty: pydantic.StrictInt
            price: float
            address: AddressModel
            note: str | None = None

        return OrderModel
    return None


def validate_loop(kind: str, n: int) -> None:
    from geventtcp.schema import compile_params

    validate = compile_params(schema_class(kind)).validate
    for _ in range(n):
        validate(PARAMS)


def request_loop(kind: str, n: int) -> None:
    """``n`` batches of BATCH pipelined requests through a Server in this process."""
    from gevent import socket

    from geventtcp import Registry, Server

    reg = Registry()
    reg.add(1, lambda request: "ok", params=schema_class(kind))
    server = Server(reg, bind="127.0.0.1:0")
    server.start()
    try:
        sock = socket.create_connection(server.address[:2])
        batch = (json.dumps({"cmdid": 1, "timestamp": 0, "params": PARAMS}) + "\n").encode() * BATCH
        buffer = b""
        for _ in range(n):
            sock.sendall(batch)
            while buffer.count(b"\n") < BATCH:
                buffer += sock.recv(1 << 20)
            assert b'"code":0' in buffer[:40], buffer[:200]
            buffer = b""
        sock.close()
    finally:
        server.close()


def timed(kind: str, what: str) -> float:
    """Microseconds per validation or per request, best of 5."""
    if what == "validate":
        if kind == "none":
            return 0.0
        n = 20000
        best = min(timeit.repeat(lambda: validate_loop(kind, n), number=1, repeat=5))
        return best / n * 1e6
    n = 20
    best = min(timeit.repeat(lambda: request_loop(kind, n), number=1, repeat=5))
    return best / (n * BATCH) * 1e6


def instructions(kind: str, what: str) -> float:
    """Instructions per validation or per request: (run of 2N - run of N) / N under callgrind."""
    if what == "validate" and kind == "none":
        return 0.0
    n = 4000 if what == "validate" else 10
    per = n if what == "validate" else n * BATCH
    totals = []
    for count in (n, 2 * n):
        out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                              __file__, "--run", what, kind, str(count)], capture_output=True, text=True, check=True)
        totals.append(int(re.search(r"Collected : (\d+)", out.stderr).group(1)))  # type: ignore[union-attr]
    return (totals[1] - totals[0]) / per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead of timing")
    parser.add_argument("--run", nargs=3, metavar=("WHAT", "KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        what, kind, n = args.run
        (validate_loop if what == "validate" else request_loop)(kind, int(n))
        return
    measure, unit, fmt = (instructions, "instructions", "{:,.0f}") if args.callgrind else (timed, "us", "{:.2f}")
    base = measure("none", "request")
    print(f"| schema | validate ({unit}) | request ({unit}) | added per request |")
    print("|---|---:|---:|---:|")
    for kind in KINDS:
        request = base if kind == "none" else measure(kind, "request")
        added = request - base
        print(f"| {kind} | {fmt.format(measure(kind, 'validate'))} | {fmt.format(request)} | "
              f"{'-' if kind == 'none' else fmt.format(added)} ({added / base:+.0%}) |")


if __name__ == "__main__":
    main()
