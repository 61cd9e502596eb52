"""The documentation site: generated reference pages are current, tables agree with the code, the
quickstart and handlers pages' code runs as shown, and every command names files a clone has.

The mkdocs build itself (broken links and anchors) runs in .ci/run (`mkdocs build --strict`), not
here: the suite does not need the docs extra installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from geventtcp import docgen
from geventtcp.errors import ERROR_CLASSES, Code
from tests.support.servers import CliServer
from tests.support.system import ROOT

DOCS = Path(ROOT) / "docs"
README = Path(ROOT) / "README.md"

# A fenced block preceded by ``<!-- test: KIND -->`` (KIND: app, client or output).
_MARKED = re.compile(r"<!-- test: (\w+) -->\n```(\w*)\n(.*?)\n```", re.S)


def marked_blocks(page: Path) -> list[tuple[str, str]]:
    """(kind, code) of every marked block of ``page``, in order."""
    return [(kind, code) for kind, _lang, code in _MARKED.findall(page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("name", sorted(docgen.PAGES))
def test_reference_page_is_generated_from_the_code(name: str) -> None:
    text = (DOCS / name).read_text(encoding="utf-8")
    assert text == docgen.PAGES[name](), f"docs/{name} is stale: regenerate with python -m geventtcp.docgen"


@pytest.mark.subprocess
def test_docgen_check_reports_a_stale_page_and_regenerates_it(tmp_path: Path) -> None:
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert docgen.stale_pages(tmp_path) == []
    page = tmp_path / "reference" / "codes.md"
    page.write_text(page.read_text().replace("`DeadlineExceeded`", "`Oops`"))
    assert docgen.stale_pages(tmp_path) == ["reference/codes.md"]
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 1
    out = subprocess.run([sys.executable, "-m", "geventtcp.docgen", "--docs", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 0


def test_generated_pages_cover_every_code_and_verb() -> None:
    codes = docgen.render_codes()
    for code in Code:
        assert f"| {int(code)} | `{code.name}` |" in codes
    from geventtcp.cli.main import COMMANDS, build_parser

    build_parser()
    cli = docgen.render_cli()
    assert COMMANDS and all(f"\n## {verb}\n" in cli for verb in COMMANDS)
    assert "`--max-line-bytes` `MAX_LINE_BYTES`" in cli


def test_protocol_page_reply_codes_table_matches_errors() -> None:
    """The hand-written table (meaning, whether the handler ran) names codes and classes from errors.py."""
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    table = text[text.index("## Reply codes"):]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")]
            for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row[0]) for row in rows] == [int(c) for c in Code]
    for code, name, *_, exception in rows:
        assert Code(int(code)).name == name
        expected = f"`{ERROR_CLASSES[int(code)].__name__}`" if int(code) else "(returns `data`)"
        assert exception == expected


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md", "docs/handlers.md", "docs/observability.md"])
def test_page_code_runs_against_a_real_server(page: str, tmp_path: Path) -> None:
    """The page's app blocks are served by ``geventtcp serve`` on port 0; each client block runs
    against it (its 127.0.0.1:PORT replaced by the real address) and prints the output block."""
    blocks = marked_blocks(Path(ROOT) / page)
    kinds = [kind for kind, _ in blocks]
    assert "app" in kinds and "client" in kinds, f"{page} has no runnable app and client blocks"
    (tmp_path / "docapp.py").write_text("\n\n".join(code for kind, code in blocks if kind == "app") + "\n")
    server = CliServer([sys.executable, "-m", "geventtcp", "serve", "docapp", "--bind", "127.0.0.1:0"],
                       cwd=tmp_path)
    try:
        for index, (kind, code) in enumerate(blocks):
            if kind != "client":
                continue
            script = tmp_path / f"client{index}.py"
            script.write_text(re.sub(r"127\.0\.0\.1:\d+", server.address, code) + "\n")
            out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, out.stderr
            following = blocks[index + 1] if index + 1 < len(blocks) else ("", "")
            assert following[0] == "output", f"{page}: a client block without an output block after it"
            assert out.stdout.strip() == following[1].strip()
    finally:
        server.stop()
    assert server.proc.returncode is not None


def _commands(text: str) -> list[str]:
    """The lines of the sh/console blocks and the inline code spans of a page."""
    fenced = re.findall(r"```(?:sh|bash|console|)\n(.*?)\n```", text, re.S)
    return [line for block in fenced for line in block.splitlines()] + re.findall(r"`([^`\n]+)`", text)


def test_commands_name_only_files_a_clone_has() -> None:
    """Every command in the README and the docs works from a clone of this repository alone."""
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    missing = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{page.name} points outside the repository"
        for command in _commands(text):
            for path in re.findall(r"(?<![\w/.-])((?:bench|fuzz|deploy|tests|handlers|docs|\.ci)/[\w./-]+\.\w+|"
                                   r"\.ci/run|manage\.py|mkdocs\.yml)", command):
                if not (Path(ROOT) / path).exists():
                    missing.append(f"{page.name}: {path}")
    assert not missing, missing


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    """The README is the front page (at most ~6 KB); its first blocks run the example and the tests
    exactly as the quickstart shows, and its test command is the one .ci/run runs."""
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 6 * 1024
    blocks = re.findall(r"```sh\n(.*?)\n```", text, re.S)
    assert blocks[0] == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python manage.py"
    assert blocks[1].endswith(".venv/bin/python -m pytest")
    assert "-m pytest" in (Path(ROOT) / ".ci" / "run").read_text()
    quickstart = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert blocks[0] in quickstart and blocks[1] in quickstart


def test_mkdocs_nav_lists_every_page() -> None:
    nav = (Path(ROOT) / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert [p for p in pages if f": {p}\n" not in nav] == []
