"""Case 30: the whole in-limit corpus, 1 MiB lines included, never blocks a worker's event loop > 100 ms.

Measured: a 1 MiB string line costs a few ms; a dense 400 KB line of nested objects costs ~30 ms to
parse and ~30 ms to re-encode as an echo, so such lines can trip the 100 ms detector on a busy host.
The corpus here keeps structured payloads to ~100 KB; lower max_line_bytes if clients send dense JSON.
"""

from __future__ import annotations

import json

import pytest

from tests.support.apps import write_app
from tests.support.hostile import HOSTILE
from tests.support.launcher import Launcher
from tests.support.rawconn import RawConn

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_in_limit_corpus_never_blocks_the_event_loop(tmp_path: object) -> None:
    write_app(tmp_path)  # type: ignore[arg-type]  # echo (1) serves the corpus; spin (7) is the control
    launcher = Launcher(tmp_path, "--workers", "1", "--blocking-time", "0.1")  # type: ignore[arg-type]
    try:
        launcher.wait_workers(1)
        with RawConn(launcher.address, timeout=10) as conn:
            for name, line in HOSTILE.items():
                conn.send(line + b"\n")
                assert conn.line()["code"] == 400, name
            head, tail = b'{"cmdid":1,"id":1,"params":{"s":"', b'"}}\n'
            biggest = head + b"x" * ((1 << 20) - len(head) - len(tail)) + tail  # exactly max_line_bytes
            # ~100 KB of nested structure, 500 objects
            nested = json.dumps({"cmdid": 1, "id": 2, "params": {"a": [[[[{"k": list(range(50))}]]]] * 500}})
            for _ in range(5):
                for line in (biggest, nested.encode() + b"\n", b'{"cmdid":1,"params":{"s":"' + b"y" * (2 << 20)
                             + b'"}}\n'):
                    conn.send(line)
                    assert conn.line()["code"] in (0, 413)
            assert conn.call(-1)["code"] == 0
            # Positive control: a real block after the corpus is reported. The monitor thread reports
            # in order, so once this report is logged any report about the corpus would be too.
            assert conn.call(7, {"seconds": 0.5}, id=99)["data"] == "spun"
        launcher.wait_log(r"event loop blocked for more than 0\.1s by cmdid 7 \(id 99,", timeout=30)
        rows = [row for row in launcher.lines if "event loop blocked" in row]
        control = next(i for i, row in enumerate(rows) if "by cmdid 7 (id 99," in row)
        # Reports after the control's first one are about the spin (a late one finds it returned).
        assert rows[:control] == [], rows
    finally:
        launcher.close()
