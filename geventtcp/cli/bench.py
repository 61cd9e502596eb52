"""``geventtcp bench HOST:PORT``: load a running server, in the spirit of redis-benchmark.

Requests carry ``--params`` (one object), ``--params-file`` (one object per line, sent in turn) or
``params.data`` of ``--payload-size`` bytes, plus ``--meta``; error replies are counted by code with
the first message of each, so a run that fails says why.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from geventtcp.cli.commands import command

__all__: list[str] = []


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST:PORT", help="server to load (TCP)")
    parser.add_argument("-c", "--connections", type=int, default=50, help="connections in total [50]")
    parser.add_argument("-P", "--pipeline", type=int, default=1, help="requests in flight per connection [1]")
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds to measure [5]")
    parser.add_argument("-n", "--requests", type=int, default=0,
                        help="stop after this many replies instead of after --duration")
    parser.add_argument("-s", "--payload-size", type=int, default=16,
                        help="bytes of text in params.data of each request [16]")
    parser.add_argument("--cmdid", type=int, default=1, help="command to call; it should answer code 0 [1: echo]")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--params", metavar="JSON", help="params object of every request (instead of params.data)")
    source.add_argument("--params-file", metavar="PATH",
                        help="one params object per line (JSON); the connections send them in turn, cycling")
    parser.add_argument("--meta", metavar="JSON", help="object sent as the meta field of every request")
    parser.add_argument("-p", "--processes", type=int, default=1,
                        help="driver processes sharing the connections, so the tool is not the bottleneck [1]")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds run before measuring [0]")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="live progress line on stderr [default: when stderr is a terminal]")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


@command("bench", "load a server with echo-style requests and report req/s and latency percentiles", _arguments)
def _bench(args: argparse.Namespace) -> int:
    import socket

    from geventtcp.cli.loadgen import BenchConfig, run
    from geventtcp.errors import ConfigError
    from geventtcp.sockets import parse_address

    try:
        family, address = parse_address(args.address)
        if family == socket.AF_UNIX:
            raise ConfigError("bench drives TCP servers; give HOST:PORT")
    except ConfigError as exc:
        print(f"geventtcp bench: {exc}", file=sys.stderr)
        return 2
    host, port = address[0], address[1]
    try:
        params = _params(args)
        meta = _object(args.meta, "--meta") if args.meta is not None else None
    except (ConfigError, OSError) as exc:
        print(f"geventtcp bench: {exc}", file=sys.stderr)
        return 2
    cfg = BenchConfig(host=str(host), port=int(port), connections=args.connections, pipeline=args.pipeline,
                      duration=args.duration, requests=args.requests, payload_size=args.payload_size,
                      cmdid=args.cmdid, processes=args.processes, warmup=args.warmup, params=params, meta=meta)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    last = [0.0, 0]

    def progress(seconds: float, replies: int) -> None:
        if seconds - last[0] < 0.25:
            return
        rate = (replies - last[1]) / (seconds - last[0])
        last[0], last[1] = seconds, replies
        sys.stderr.write(f"\r{seconds:6.1f} s  {replies:>10} replies  {rate:>10.0f} req/s ")
        sys.stderr.flush()

    try:
        result = run(cfg, progress if show else None)
    except ValueError as exc:
        print(f"geventtcp bench: {exc}", file=sys.stderr)
        return 2
    if show:
        sys.stderr.write("\n")
    data = result.as_dict()
    data["config"] = {"address": args.address, "connections": cfg.connections, "pipeline": cfg.pipeline,
                      "processes": cfg.processes, "payload_size": cfg.payload_size, "cmdid": cfg.cmdid,
                      "params": _describe_params(args, params), "meta": meta}
    if args.json:
        print(json.dumps(data))
    else:
        lat = data["latency_ms"]
        print(f"geventtcp bench {args.address}: {cfg.connections} connections x {cfg.pipeline} in flight, "
              f"{cfg.processes} process(es), {data['config']['params']}, cmdid {cfg.cmdid}")
        print(f"  requests   {result.completed} in {result.seconds:.2f} s, errors {result.errors}")
        print(f"  throughput {result.rps:.0f} req/s")
        print(f"  latency ms min {lat['min']:.3f}  p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  "
              f"p99 {lat['p99']:.3f}  p99.9 {lat['p999']:.3f}  max {lat['max']:.3f}")
        for row in data["errors_by_code"]:
            code = "-" if row["code"] is None else row["code"]
            print(f"  errors     code {code} {row['name'] or ''}: {row['count']}, first: {row['first_msg']}")
        for failure in result.failures:
            print(f"  failure: {failure}")
    return 0 if result.completed and not result.errors and not result.failures else 1


def _object(text: str, what: str) -> dict[str, Any]:
    from geventtcp.errors import ConfigError

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _params(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The params objects to send in turn: ``--params``, the lines of ``--params-file``, or None (payload)."""
    from geventtcp.errors import ConfigError

    if args.params is not None:
        return [_object(args.params, "--params")]
    if args.params_file is None:
        return None
    with open(args.params_file, encoding="utf-8") as fh:
        objects = [_object(line, f"{args.params_file} line {n}") for n, line in enumerate(fh, 1) if line.strip()]
    if not objects:
        raise ConfigError(f"{args.params_file}: no params object (one JSON object per line)")
    return objects


def _describe_params(args: argparse.Namespace, params: list[dict[str, Any]] | None) -> str:
    if params is None:
        return f"{args.payload_size}-byte payload"
    if args.params_file is not None:
        return f"params from {args.params_file} ({len(params)} objects, cycled)"
    return "params " + json.dumps(params[0])[:80]
