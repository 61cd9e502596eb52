"""docs/testing.md runs as shown: its app, conftest, ini and test blocks make a project whose tests pass
(the guide's fixtures, marker and in-process client, used by a project as the guide tells)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.system import ROOT
from tests.test_docs import marked_blocks

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

GUIDE = Path(ROOT) / "docs" / "testing.md"


def test_the_guides_project_passes(pytester: pytest.Pytester) -> None:
    blocks: dict[str, list[str]] = {}
    for kind, code in marked_blocks(GUIDE):
        blocks.setdefault(kind, []).append(code)
    assert sorted(blocks) == ["app", "conftest", "ini", "tests"]
    pytester.makepyfile(orders="\n\n".join(blocks["app"]))
    pytester.makeconftest("\n\n".join(blocks["conftest"]))
    pytester.makefile(".ini", pytest="\n".join(blocks["ini"]))
    tests = "\n\n".join(blocks["tests"])
    pytester.makepyfile(test_orders=tests)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(re.findall(r"^def test_", tests, re.M)))
