"""Settings, each declared once: the declaration drives the CLI flag, config-file key, env var and docs.

Precedence, lowest to highest: built-in default < config file (``-c``: TOML, or a Python file of
assignments like gunicorn's) < ``GEVENTTCP_<NAME>`` environment variable < command-line flag.
"""

from __future__ import annotations

import argparse
import os
import runpy
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["Setting", "SETTINGS", "Config", "add_arguments", "load", "render_markdown", "parse_size", "parse_bool"]

ENV_PREFIX = "GEVENTTCP_"


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_size(value: Any) -> int:
    """An integer byte count; accepts suffixes K, M, G (binary: 1K = 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    return int(float(number) * scale)


def _positive(value: Any) -> None:
    if value < 0:
        raise ValueError("must not be negative")


def _workers(value: Any) -> int:
    if str(value).strip().lower() == "auto":
        return 0
    return int(value)


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part) for part in value]


@dataclass(frozen=True)
class Setting:
    """One setting: its name is the config-file key; ``cli`` its flags; the env var is derived."""

    name: str
    default: Any
    help: str
    section: str = "server"
    convert: Callable[[Any], Any] = str
    cli: tuple[str, ...] = ()
    metavar: str | None = None
    validate: Callable[[Any], None] | None = None
    append: bool = False  # repeatable flag (e.g. --bind)
    flag: bool = False  # boolean switch (--access-log, --no-access-log)
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flags(self) -> tuple[str, ...]:
        return self.cli or ("--" + self.name.replace("_", "-"),)

    def coerce(self, value: Any, source: str) -> Any:
        try:
            result = self.convert(value)
            if self.choices is not None and result not in self.choices:
                raise ValueError(f"choose one of {', '.join(self.choices)}")
            if self.validate is not None:
                self.validate(result)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.name} ({source}): invalid value {value!r}: {exc}") from None
        return result


SETTINGS: tuple[Setting, ...] = (
    Setting("bind", ["127.0.0.1:8889"], "Address to listen on: HOST:PORT, [IPv6]:PORT or unix:PATH; repeat for more.",
            convert=_str_list, cli=("-b", "--bind"), metavar="ADDRESS", append=True),
    Setting("workers", 1, "Worker processes; 0 or 'auto' for one per CPU.", section="process", convert=_workers,
            cli=("-w", "--workers"), validate=_positive),
    Setting("max_connections", 10000, "Connections per worker; one over the limit gets a 503 line and is closed.",
            convert=int, validate=_positive),
    Setting("max_connections_per_peer", 256, "Connections per worker from one peer IP address; one over gets a "
            "503 line and is closed (0: no limit).", convert=int, validate=_positive),
    Setting("max_line_bytes", 1 << 20, "Longest request line (newline included); longer lines get 413.",
            convert=parse_size, validate=_positive),
    Setting("max_reply_bytes", 16 << 20, "Longest reply line; a larger result is replaced by a 413 reply.",
            convert=parse_size, validate=_positive),
    Setting("idle_timeout", 300.0, "Seconds a connection may sit with nothing in flight before a goaway closes it "
            "(0: never).", section="timeouts", convert=float, validate=_positive),
    Setting("request_timeout", 10.0, "Seconds a started request line has to arrive whole (slowloris guard).",
            section="timeouts", convert=float, validate=_positive),
    Setting("handler_timeout", 30.0, "Default deadline of a handler when the request carries no timeout_ms "
            "(0: none).", section="timeouts", convert=float, validate=_positive),
    Setting("write_timeout", 30.0, "Seconds without write progress to a peer that reads nothing before it is "
            "dropped.", section="timeouts", convert=float, validate=_positive),
    Setting("graceful_timeout", 30.0, "Seconds a draining server waits for requests in flight before stopping "
            "them.", section="timeouts", convert=float, validate=_positive),
    Setting("max_inflight_per_connection", 128, "Blocked requests in flight on one connection; more get a "
            "retryable 503.", convert=int, validate=_positive),
    Setting("max_inflight", 10000, "Blocked requests in flight per worker; more get a retryable 503.",
            convert=int, validate=_positive),
    Setting("backlog", 2048, "Listen backlog.", convert=int, validate=_positive),
    Setting("codec", "simplejson", "JSON codec: simplejson, or orjson when installed (geventtcp[fast]).",
            choices=("simplejson", "orjson")),
    Setting("certfile", "", "TLS: PEM certificate chain of the server; enables TLS on every listener.",
            section="security"),
    Setting("keyfile", "", "TLS: PEM private key of the server (default: inside certfile).", section="security"),
    Setting("ca_certs", "", "TLS: PEM CA bundle used to verify client certificates.", section="security"),
    Setting("tls_require_client_cert", False, "TLS: refuse clients without a certificate signed by ca_certs.",
            section="security", convert=parse_bool, flag=True),
    Setting("tls_handshake_timeout", 10.0, "Seconds a TLS handshake may take before the connection is dropped.",
            section="security", convert=float, validate=_positive),
    Setting("auth_token", "", "Shared secret: when set, a connection must send AUTH (cmdid -4) with it first "
            "(prefer the env var or auth_token_file: flags show in ps).", section="security"),
    Setting("auth_timeout", 10.0, "Seconds from connect a connection has to authenticate when auth is on; then "
            "it gets a 401 line and is closed, or is dropped if it is not reading its replies (0: no limit).",
            section="security", convert=float, validate=_positive),
    Setting("auth_token_file", "", "Read the shared secret from this file (surrounding whitespace stripped).",
            section="security"),
    Setting("protected_mode", True, "Without auth_token or TLS client certificates, refuse to listen on a "
            "non-loopback address and deny non-loopback peers (--no-protected-mode to allow).",
            section="security", convert=parse_bool, flag=True),
    Setting("log_level", "info", "Level of the geventtcp loggers.", section="logging",
            convert=lambda v: str(v).lower(), choices=("debug", "info", "warning", "error", "critical")),
    # -- operations (launcher, logging, introspection) ---------------------------------------
    Setting("timeout", 30.0, "Heartbeat timeout: a worker whose event loop is stuck this many seconds is killed "
            "(SIGABRT, then SIGKILL) and replaced (0: never).", section="process", convert=float,
            validate=_positive),
    Setting("reuse_port", True, "Give each worker its own SO_REUSEPORT listener per TCP address, so the kernel "
            "spreads connections evenly (off: all workers accept from one shared socket).", section="process",
            convert=parse_bool, flag=True),
    Setting("max_requests", 0, "Requests a worker serves before it drains and is replaced (0: never).",
            section="process", convert=int, validate=_positive),
    Setting("max_requests_jitter", 0, "Random 0..N added to max_requests per worker, so workers do not restart "
            "together.", section="process", convert=int, validate=_positive),
    Setting("max_connection_age", 0.0, "Seconds after which a connection gets a goaway 'max_age' once idle, so "
            "clients move to new workers (0: never).", section="timeouts", convert=float, validate=_positive),
    Setting("max_connection_age_jitter", 0.1, "Fraction of max_connection_age added at random per connection.",
            section="timeouts", convert=float, validate=_positive),
    Setting("pidfile", "", "Write the master's pid to this file (removed on exit).", section="process"),
    Setting("log_file", "", "Log to this file instead of stderr; SIGUSR1 reopens it (log rotation).",
            section="logging"),
    Setting("access_log", False, "Log one line per request (peer, cmdid, id, code, duration) to the "
            "geventtcp.access logger.", section="logging", convert=parse_bool, flag=True),
    Setting("log_config", "", "A logging.config.dictConfig file (.json, .toml or a Python file defining "
            "LOGGING_CONFIG); applied after the other logging settings.", section="logging"),
    Setting("blocking_time", 0.1, "Log a warning naming the running cmdid when a handler blocks the event loop "
            "this many seconds (a heartbeat watcher thread; 0: off).", section="logging", convert=float,
            validate=_positive),
    Setting("metrics_bind", "", "HOST:PORT where the master serves Prometheus text metrics aggregated over the "
            "workers (empty: off).", section="logging"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass
class Config:
    """Resolved settings; attribute access by setting name; ``sources`` says where each came from."""

    values: dict[str, Any] = field(default_factory=lambda: {s.name: s.default for s in SETTINGS})
    sources: dict[str, str] = field(default_factory=lambda: {s.name: "default" for s in SETTINGS})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def set(self, name: str, value: Any, source: str) -> None:
        setting = _BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"unknown setting {name!r} ({source})")
        self.values[name] = setting.coerce(value, source)
        self.sources[name] = source

    def update(self, items: Mapping[str, Any], source: str) -> None:
        for name, value in items.items():
            self.set(name, value, source)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Config:
        config = cls()
        config.update(kwargs, "argument")
        return config


def add_arguments(parser: argparse.ArgumentParser, settings: Iterable[Setting] = SETTINGS) -> None:
    """Add one flag per setting; unset flags stay ``None`` so lower-precedence sources show through."""
    groups: dict[str, Any] = {}
    for s in settings:
        group = groups.get(s.section) or groups.setdefault(s.section, parser.add_argument_group(s.section))
        helptext = f"{s.help} [default: {s.default}; env {s.env}]"
        if s.flag:
            group.add_argument(*s.flags, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                               help=helptext)
        elif s.append:
            group.add_argument(*s.flags, dest=s.name, action="append", default=None, metavar=s.metavar, help=helptext)
        else:
            group.add_argument(*s.flags, dest=s.name, default=None, metavar=s.metavar or s.name.upper(),
                               help=helptext)


def read_file(path: str) -> dict[str, Any]:
    """Read a config file: ``*.toml`` (top level or a ``[geventtcp]`` table) or a Python file."""
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
            data = data.get("geventtcp", data)
        else:
            data = {k: v for k, v in runpy.run_path(path).items() if not k.startswith("_") and k in _BY_NAME}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError, SyntaxError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a table of settings")
    unknown = sorted(set(data) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    return data


def load(cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         config_file: str | None = None) -> Config:
    """Resolve every setting from its sources, in precedence order; :class:`ConfigError` on bad input."""
    config = Config()
    if config_file:
        config.update(read_file(config_file), f"file {config_file}")
    environ = os.environ if env is None else env
    for s in SETTINGS:
        if s.env in environ:
            config.set(s.name, environ[s.env], f"env {s.env}")
    for name, value in (cli or {}).items():
        if name in _BY_NAME and value is not None:
            config.set(name, value, "command line")
    return config


def render_markdown() -> str:
    """The README's settings table, generated from the declarations."""
    rows = ["| setting | flag | env | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = ", ".join(map(str, s.default)) if isinstance(s.default, list) else s.default
        rows.append(f"| `{s.name}` | `{'`, `'.join(s.flags)}` | `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)
