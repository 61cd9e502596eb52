"""Settings: one declaration drives flag, file key, env var and docs; precedence is documented."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from geventtcp.config import SETTINGS, Config, add_arguments, load, parse_size, render_markdown
from geventtcp.errors import ConfigError

#: The settings table lives in the docs site; the README links to it.
SETTINGS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "settings.md"


def parse(argv: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(argv))


def test_precedence_default_file_env_cli(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text('idle_timeout = 11\nmax_line_bytes = "2K"\nbacklog = 7\n')
    env = {"GEVENTTCP_IDLE_TIMEOUT": "22", "GEVENTTCP_BACKLOG": "8"}
    config = load(parse(["--backlog", "9"]), env=env, config_file=str(toml))
    assert config.max_line_bytes == 2048 and config.sources["max_line_bytes"] == f"file {toml}"
    assert config.idle_timeout == 22.0 and config.sources["idle_timeout"] == "env GEVENTTCP_IDLE_TIMEOUT"
    assert config.backlog == 9 and config.sources["backlog"] == "command line"
    assert config.request_timeout == 10.0 and config.sources["request_timeout"] == "default"


def test_python_config_file_and_geventtcp_table(tmp_path: Path) -> None:
    py = tmp_path / "geventtcp.conf.py"
    py.write_text("workers = 3\nbind = ['127.0.0.1:1', 'unix:/tmp/x.sock']\n_private = 1\nimport os\n")
    config = load({}, env={}, config_file=str(py))
    assert config.workers == 3 and config.bind == ["127.0.0.1:1", "unix:/tmp/x.sock"]
    toml = tmp_path / "pyproject-like.toml"
    toml.write_text("[geventtcp]\nworkers = 'auto'\n")
    assert load({}, env={}, config_file=str(toml)).workers == 0


def test_repeatable_bind_flag() -> None:
    assert load(parse(["-b", "127.0.0.1:1", "--bind", "unix:/tmp/s"]), env={}).bind == ["127.0.0.1:1", "unix:/tmp/s"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"max_connections": "many"}, "max_connections"),
        ({"idle_timeout": "-1"}, "must not be negative"),
        ({"codec": "yaml"}, "choose one of"),
        ({"log_level": "loud"}, "choose one of"),
    ],
)
def test_invalid_values_name_the_setting(source: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(source, env={})


def test_unknown_keys_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load({}, env={}, config_file=str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load({}, env={}, config_file=str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError):
        Config().set("nope", 1, "test")


def test_sizes() -> None:
    assert [parse_size(v) for v in ("1M", "64k", "2KiB", 10, "1.5K")] == [1 << 20, 65536, 2048, 10, 1536]


def test_every_setting_has_flag_env_and_help() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for s in SETTINGS:
        assert s.help and s.env == "GEVENTTCP_" + s.name.upper() and s.flags[-1].startswith("--")


def test_settings_table_is_generated_from_the_declarations() -> None:
    text = SETTINGS_PAGE.read_text()
    start = text.index("<!-- settings-table:start -->\n") + len("<!-- settings-table:start -->\n")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == render_markdown().strip(), (
        "docs/reference/settings.md is stale: regenerate it with python -m geventtcp.docgen")


def test_unknown_name_in_a_python_config_file_is_an_error(tmp_path: Path) -> None:
    """A typo in a Python config file fails like one in TOML, naming it and the closest setting."""
    py = tmp_path / "geventtcp.conf.py"
    py.write_text("import os\nfrom pathlib import Path\n_base = 2\n\n\ndef helper() -> int:\n    return 1\n\n\n"
                  "worker = 4\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) in .*: worker \(did you mean 'workers'\?\)"):
        load({}, env={}, config_file=str(py))
    py.write_text("import os\nfrom pathlib import Path\n_base = 2\n\n\ndef helper() -> int:\n    return 1\n\n\n"
                  "workers = helper() + _base\n")
    assert load({}, env={}, config_file=str(py)).values["workers"] == 3


def test_unknown_keyword_suggests_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"'max_inflght' \(argument\) \(did you mean 'max_inflight'\?\)"):
        Config.from_kwargs(max_inflght=5)
