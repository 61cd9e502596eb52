"""Settings: one declaration drives flag, file key, env var and docs; precedence is documented."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from geventtcp import Registry, Server
from geventtcp.config import SETTINGS, Config, Settings, add_arguments, load, parse_size, render_markdown
from geventtcp.errors import ConfigError, RegistryError
from tests.support.system import ROOT

#: The settings table lives in the docs site; the README links to it.
SETTINGS_PAGE = Path(ROOT) / "docs" / "reference" / "settings.md"


def parse(argv: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(argv))


def test_precedence_default_file_env_cli(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text('idle_timeout = 11\nmax_line_bytes = "2K"\nbacklog = 7\n')
    env = {"GEVENTTCP_IDLE_TIMEOUT": "22", "GEVENTTCP_BACKLOG": "8"}
    config = load(parse(["--backlog", "9"]), env=env, config_file=str(toml))
    settings = config.freeze()
    assert settings.max_line_bytes == 2048 and config.sources["max_line_bytes"] == f"file {toml}"
    assert settings.idle_timeout == 22.0 and config.sources["idle_timeout"] == "env GEVENTTCP_IDLE_TIMEOUT"
    assert settings.backlog == 9 and config.sources["backlog"] == "command line"
    assert settings.request_timeout == 10.0 and config.sources["request_timeout"] == "default"


def test_python_config_file_and_geventtcp_table(tmp_path: Path) -> None:
    py = tmp_path / "geventtcp.conf.py"
    py.write_text("workers = 3\nbind = ['127.0.0.1:1', 'unix:/tmp/x.sock']\n_private = 1\nimport os\n")
    settings = load({}, env={}, config_file=str(py)).freeze()
    assert settings.workers == 3 and settings.bind == ["127.0.0.1:1", "unix:/tmp/x.sock"]
    toml = tmp_path / "pyproject-like.toml"
    toml.write_text("[geventtcp]\nworkers = 'auto'\n")
    assert load({}, env={}, config_file=str(toml)).freeze().workers == 0


def test_repeatable_bind_flag() -> None:
    config = load(parse(["-b", "127.0.0.1:1", "--bind", "unix:/tmp/s"]), env={})
    assert config.freeze().bind == ["127.0.0.1:1", "unix:/tmp/s"]


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


#: Each setting's option strings as ``add_arguments`` registered them before the declarations became
#: the fields of ``Settings``: a new setting may be added anywhere; these keep their names, flags,
#: env vars and order.
FLAGS_BEFORE_SETTINGS_DATACLASS = """
bind -b --bind
workers -w --workers
max_connections --max-connections
max_connections_per_peer --max-connections-per-peer
max_line_bytes --max-line-bytes
max_reply_bytes --max-reply-bytes
idle_timeout --idle-timeout
request_timeout --request-timeout
handler_timeout --handler-timeout
write_timeout --write-timeout
graceful_timeout --graceful-timeout
max_inflight_per_connection --max-inflight-per-connection
max_inflight --max-inflight
backlog --backlog
codec --codec
certfile --certfile
keyfile --keyfile
ca_certs --ca-certs
tls_require_client_cert --tls-require-client-cert --no-tls-require-client-cert
tls_handshake_timeout --tls-handshake-timeout
auth_token --auth-token
auth_timeout --auth-timeout
auth_token_file --auth-token-file
protected_mode --protected-mode --no-protected-mode
log_level --log-level
timeout --timeout
reuse_port --reuse-port --no-reuse-port
max_requests --max-requests
max_requests_jitter --max-requests-jitter
max_connection_age --max-connection-age
max_connection_age_jitter --max-connection-age-jitter
pidfile --pidfile
bind_file --bind-file
log_file --log-file
access_log --access-log --no-access-log
log_config --log-config
blocking_time --blocking-time
metrics_bind --metrics-bind
"""


def test_settings_names_flags_and_env_vars_are_unchanged() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    registered = {action.dest: " ".join(action.option_strings) for action in parser._actions if action.dest != "help"}
    before = dict(line.split(" ", 1) for line in FLAGS_BEFORE_SETTINGS_DATACLASS.strip().splitlines())
    assert [s.name for s in SETTINGS if s.name in before] == list(before)  # none lost or reordered
    by_name = {s.name: s for s in SETTINGS}
    for name, flags in before.items():
        assert registered[name] == flags
        assert by_name[name].env == "GEVENTTCP_" + name.upper()


def test_every_settings_field_is_a_declared_setting() -> None:
    """SETTINGS is derived from the fields; each has help and a section, and its default passes its
    own converter and validator unchanged, with the field's declared type."""
    hints = typing.get_type_hints(Settings)
    assert [f.name for f in dataclasses.fields(Settings)] == [s.name for s in SETTINGS] == list(hints)
    for s in SETTINGS:
        assert s.help.strip() and s.section.strip(), s.name
        assert s.coerce(s.default, "default") == s.default, s.name
        assert isinstance(s.default, typing.get_origin(hints[s.name]) or hints[s.name]), s.name
    assert Config().freeze() == Settings()


def test_settings_are_frozen_slotted_and_detached_from_the_config() -> None:
    config = Config()
    settings = config.freeze()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_inflight = 1  # type: ignore[misc]
    assert not hasattr(settings, "__dict__")
    config.values["bind"].append("127.0.0.1:2")
    config.set("max_inflight", 7, "test")
    assert settings.bind == ["127.0.0.1:8889"] and settings.max_inflight == 10000
    assert Config().values["bind"] == ["127.0.0.1:8889"]  # the declared default was not changed either
    assert Settings().bind is not Settings().bind  # a list default is copied per instance


def test_server_settings_are_typed_and_frozen_from_keywords_over_config() -> None:
    config = load({}, env={})
    config.set("idle_timeout", "5", "test")
    server = Server(Registry(), "127.0.0.1:0", config=config, max_inflight=5)
    assert isinstance(server.settings, Settings)
    assert (server.settings.max_inflight, server.settings.idle_timeout, server.settings.bind) == (
        5, 5.0, ["127.0.0.1:0"])
    assert config.values["max_inflight"] == 10000 and config.values["bind"] == ["127.0.0.1:8889"]
    assert Server(max_line_bytes="2K").settings.max_line_bytes == 2048  # keywords are coerced as flags are


GUNICORN_CONF = """
import multiprocessing

bind = "127.0.0.1:8000"
workers = multiprocessing.cpu_count() * 2 + 1
worker_class = "gevent"
worker_connections = 1000
keepalive = 5

def post_fork(server, worker):
    server.log.info("Worker spawned (pid: %s)", worker.pid)

def pre_request(worker, req):
    pass

def child_exit(server, worker):
    pass
"""


def test_a_gunicorn_config_with_settings_and_hooks_geventtcp_lacks_is_refused_naming_each(tmp_path: Path) -> None:
    py = tmp_path / "gunicorn.conf.py"
    py.write_text(GUNICORN_CONF)
    with pytest.raises(ConfigError) as caught:
        load({}, env={}, config_file=str(py))
    message = str(caught.value)
    assert ("uses gunicorn setting(s) or hook(s) geventtcp does not have: child_exit, keepalive, pre_request, "
            "worker_class, worker_connections (use max_connections)") in message
    assert "post_fork" not in message and "bind" not in message  # those geventtcp has
    # What geventtcp has is kept: the same file without the rest loads, with its hook.
    py.write_text(GUNICORN_CONF.split("worker_class")[0] + GUNICORN_CONF[GUNICORN_CONF.index("def post_fork"):]
                  .split("def pre_request")[0])
    config = load({}, env={}, config_file=str(py))
    assert config.values["bind"] == ["127.0.0.1:8000"] and set(config.hooks) == {"post_fork"}


def test_hooks_of_a_python_config_file_are_checked_when_it_is_read(tmp_path: Path) -> None:
    py = tmp_path / "conf.py"
    py.write_text("def worker_exit(worker):\n    pass\n")  # gunicorn's worker_exit takes (server, worker)
    with pytest.raises(ConfigError, match=r"hook worker_exit must take 2 argument\(s\): worker_exit\(server, worker\)"):
        load({}, env={}, config_file=str(py))
    py.write_text("on_exit = 3\n")
    with pytest.raises(ConfigError, match="hook on_exit must be a function, not int"):
        load({}, env={}, config_file=str(py))
    toml = tmp_path / "conf.toml"
    toml.write_text('on_exit = "x"\n')
    with pytest.raises(ConfigError, match="hook.* on_exit: hooks are functions, set in a Python config file"):
        load({}, env={}, config_file=str(toml))
    toml.write_text("keepalive = 2\n")  # gunicorn's name in TOML gets the same answer as in Python
    with pytest.raises(ConfigError, match="gunicorn setting.* keepalive"):
        load({}, env={}, config_file=str(toml))


def test_registry_hook_takes_only_worker_hooks_with_their_arguments() -> None:
    registry = Registry()

    @registry.hook("worker_exit")
    def first(server: object, worker: object) -> None: ...

    @registry.hook("worker_exit")
    def second(*args: object) -> None: ...

    assert registry.hooks("worker_exit") == [first, second] and registry.hooks("worker_int") == []
    with pytest.raises(RegistryError, match="'post_fork' is not an application hook .*: it runs in the master or "
                                            "before the application is imported"):
        registry.hook("post_fork")
    with pytest.raises(RegistryError, match="'pre_request' is not an application hook .*: no such hook"):
        registry.hook("pre_request")
    with pytest.raises(RegistryError, match=r"hook worker_int must take 1 argument\(s\)"):
        registry.hook("worker_int")(lambda: None)
    registry.clear()
    assert registry.hooks("worker_exit") == []


def test_a_function_named_almost_as_a_hook_is_an_error_and_a_helper_is_not(tmp_path: Path) -> None:
    py = tmp_path / "conf.py"
    py.write_text("def worker_exti(server, worker):\n    pass\n")
    with pytest.raises(ConfigError, match=r"named almost as a hook, which would never run: worker_exti \(did you "
                                          r"mean 'worker_exit'\?\)"):
        load({}, env={}, config_file=str(py))
    py.write_text("def double(x):\n    return 2 * x\n\nworkers = double(1)\n")  # a helper, not a typo
    assert load({}, env={}, config_file=str(py)).values["workers"] == 2
