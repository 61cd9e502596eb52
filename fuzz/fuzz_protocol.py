"""atheris (libFuzzer) harness for the wire parser: any bytes give a Request or a ProtocolError, fast.

Run (``pip install atheris``; needs a clang-built CPython wheel or a source build)::

    mkdir -p fuzz/corpus
    python fuzz/fuzz_protocol.py -max_total_time=600 -timeout=2 fuzz/corpus fuzz/seeds   # 10 minutes
    python fuzz/fuzz_protocol.py -runs=20000 fuzz/corpus fuzz/seeds                     # a smoke run

``fuzz/seeds`` holds hand-written starting inputs; ``fuzz/corpus`` (not committed; always name it
first, libFuzzer writes new inputs to the first directory) is where it keeps what it learns; keep it
between runs so coverage accumulates. A failure writes ``crash-<sha1>`` holding the input that broke
the contract; replay it with ``python fuzz/fuzz_protocol.py crash-<sha1>``. The LineBuffer is fuzzed in
the same run: the input is also fed in chunks whose sizes come from the data, and the lines must match
a one-shot split.
"""

from __future__ import annotations

import sys
import time

import atheris

with atheris.instrument_imports():
    from geventtcp.codec import get_codec
    from geventtcp.errors import ProtocolError
    from geventtcp.protocol import LineBuffer, Request, parse_request

CODEC = get_codec("simplejson")
#: Most CPU time one parse may take (the reliability case asks for <= 100 ms; CPU time, so a busy
#: machine does not fail the run).
MAX_SECONDS = 0.1


def check_parse(line: bytes) -> None:
    started = time.process_time()
    try:
        req = parse_request(line, CODEC, ("127.0.0.1", 1))
    except ProtocolError:
        pass
    else:
        if not isinstance(req, Request) or type(req.cmdid) is not int or type(req.params) is not dict:
            raise AssertionError(f"bad request object from {line!r}")
    elapsed = time.process_time() - started
    if elapsed > MAX_SECONDS:
        raise AssertionError(f"parse took {elapsed * 1000:.0f} ms for {len(line)} bytes")


def check_linebuffer(data: bytes, cut: int, limit: int) -> None:
    buf = LineBuffer(limit)
    got: list[bytes | None] = []
    step = max(1, cut)
    for i in range(0, len(data), step):
        got.extend(buf.feed(data[i:i + step]))
        if buf.pending >= limit:
            raise AssertionError("LineBuffer holds a line that can never fit")
    whole = LineBuffer(limit).feed(data)
    if got != whole:
        raise AssertionError(f"chunked split differs from one-shot split for {data!r}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cut = fdp.ConsumeIntInRange(1, 64)
    limit = fdp.ConsumeIntInRange(2, 256)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    check_linebuffer(rest, cut, limit)
    for line in rest.split(b"\n"):
        check_parse(line)


def main() -> None:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
