"""Settings, each declared once as a field of :class:`Settings`: the declaration drives the CLI flag,
config-file key, env var, docs and the field's type.

Precedence, lowest to highest: built-in default < config file (``-c``: TOML, or a Python file of
assignments like gunicorn's) < ``GEVENTTCP_<NAME>`` environment variable < command-line flag.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import os
import runpy
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar, cast

from geventtcp.errors import ConfigError

__all__ = ["Settings", "setting", "Setting", "SETTINGS", "Config", "add_arguments", "load", "render_markdown",
           "parse_size", "parse_bool", "HOOKS", "Hook", "check_hook"]

ENV_PREFIX = "GEVENTTCP_"
T = TypeVar("T")


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


def _middleware(value: Any) -> list[Any]:
    """Comma-separated ``module:attr`` names (config file, env, CLI), or callables (``Server(middleware=[fn])``)."""
    items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else list(value)
    for item in items:
        if not callable(item) and (not isinstance(item, str) or not all(item.partition(":")[::2])):
            raise ValueError(f"{item!r} is not a 'module:attr' name or a callable")
    return items


def _networks(value: Any) -> list[str]:
    """Comma-separated addresses or CIDR networks (``*``: any peer), each checked here."""
    items = [part.strip() for item in ([value] if isinstance(value, str) else value)
             for part in str(item).split(",") if part.strip()]
    for item in items:
        if item != "*":
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
    return items


@dataclass(frozen=True)
class Setting:
    """One setting's declaration, read from a :class:`Settings` field (:data:`SETTINGS`): its name is
    the config-file key; ``cli`` its flags; the env var is derived."""

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


def setting(default: T, help: str, *, section: str = "server", convert: Callable[[Any], T] | None = None,
            cli: tuple[str, ...] = (), metavar: str | None = None, validate: Callable[[Any], None] | None = None,
            append: bool = False, flag: bool = False, choices: tuple[str, ...] | None = None) -> T:
    """Declare one field of :class:`Settings`: the arguments are those of :class:`Setting` (``convert``
    defaults to ``str``); typed as the default, so mypy checks the field's annotation against it."""
    metadata = {"help": help, "section": section, "convert": convert or str, "cli": cli, "metavar": metavar,
                "validate": validate, "append": append, "flag": flag, "choices": choices}
    if isinstance(default, list):  # a mutable default: each Settings gets its own copy
        return cast(T, field(default_factory=default.copy, metadata=metadata))
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, declared once: the field is the setting (name, type, default), its :func:`setting`
    metadata makes the flag, the config-file key, the env var and the docs row (see :data:`SETTINGS`).

    An instance is the resolved, typed, frozen value the server, workers and launcher read
    (:meth:`Config.freeze`); a read is a plain slot load, cheap enough for the request path.
    """

    bind: list[str] = setting(
        ["127.0.0.1:8889"], "Address to listen on: HOST:PORT, [IPv6]:PORT or unix:PATH; repeat for more.",
        convert=_str_list, cli=("-b", "--bind"), metavar="ADDRESS", append=True)
    workers: int = setting(
        1, "Worker processes; 0 or 'auto' for one per CPU.",
        section="process", convert=_workers, cli=("-w", "--workers"), validate=_positive)
    max_connections: int = setting(
        10000, "Connections per worker; one over the limit gets a 503 line and is closed.",
        convert=int, validate=_positive)
    max_connections_per_peer: int = setting(
        0, "Connections per worker from one peer IP address; one over gets a 503 line and is closed (0: no limit). "
        "Behind a proxy, turn on proxy_protocol so the peer is the real client.",
        convert=int, validate=_positive)
    max_line_bytes: int = setting(
        1 << 20, "Longest request line (newline included); longer lines get 413.",
        convert=parse_size, validate=_positive)
    max_reply_bytes: int = setting(
        16 << 20, "Longest reply line; a larger result is replaced by a 413 reply.",
        convert=parse_size, validate=_positive)
    idle_timeout: float = setting(
        300.0, "Seconds a connection may sit with nothing in flight before a goaway closes it (0: never).",
        section="timeouts", convert=float, validate=_positive)
    request_timeout: float = setting(
        10.0, "Seconds a started request line has to arrive whole (slowloris guard).",
        section="timeouts", convert=float, validate=_positive)
    handler_timeout: float = setting(
        30.0, "Default deadline of a handler when the request carries no timeout_ms (0: none).",
        section="timeouts", convert=float, validate=_positive)
    write_timeout: float = setting(
        30.0, "Seconds without write progress to a peer that reads nothing before it is dropped.",
        section="timeouts", convert=float, validate=_positive)
    graceful_timeout: float = setting(
        30.0, "Seconds a draining server waits for requests in flight before stopping them.",
        section="timeouts", convert=float, validate=_positive)
    max_inflight_per_connection: int = setting(
        128, "Blocked requests in flight on one connection; at the limit a command that has blocked before gets a "
        "retryable 503 (built-ins and inline commands still run).",
        convert=int, validate=_positive)
    max_inflight: int = setting(
        10000, "Blocked requests in flight per worker; at the limit a command that has blocked before gets a "
        "retryable 503 (built-ins and inline commands still run).",
        convert=int, validate=_positive)
    middleware: list[Any] = setting(
        [], "Server-level middleware, outermost first: 'module:attr' names of fn(request, call_next) callables, "
        "imported in each worker; they run around every application handler, outside the registry's own.",
        convert=_middleware, metavar="MODULE:ATTR", append=True)
    backlog: int = setting(2048, "Listen backlog.", convert=int, validate=_positive)
    codec: str = setting(
        "simplejson", "JSON codec: simplejson, or orjson when installed (geventtcp[fast]).",
        choices=("simplejson", "orjson"))
    certfile: str = setting(
        "", "TLS: PEM certificate chain of the server; enables TLS on every listener.",
        section="security")
    keyfile: str = setting("", "TLS: PEM private key of the server (default: inside certfile).", section="security")
    ca_certs: str = setting("", "TLS: PEM CA bundle used to verify client certificates.", section="security")
    tls_require_client_cert: bool = setting(
        False, "TLS: refuse clients without a certificate signed by ca_certs.",
        section="security", convert=parse_bool, flag=True)
    tls_handshake_timeout: float = setting(
        10.0, "Seconds a TLS handshake may take before the connection is dropped.",
        section="security", convert=float, validate=_positive)
    auth_token: str = setting(
        "", "Shared secret: when set, a connection must send AUTH (cmdid -4) with it first (prefer the env var or "
        "auth_token_file: flags show in ps).",
        section="security")
    auth_timeout: float = setting(
        10.0, "Seconds from connect a connection has to authenticate when auth is on; then it gets a 401 line and "
        "is closed, or is dropped if it is not reading its replies (0: no limit).",
        section="security", convert=float, validate=_positive)
    auth_token_file: str = setting(
        "", "Read the shared secret from this file (surrounding whitespace stripped).",
        section="security")
    protected_mode: bool = setting(
        True, "Without auth_token or TLS client certificates, refuse to listen on a non-loopback address and deny "
        "non-loopback peers (--no-protected-mode to allow); the metrics listener, which has no authentication, is "
        "held to loopback whatever the auth settings.",
        section="security", convert=parse_bool, flag=True)
    proxy_protocol: bool = setting(
        False, "Every connection starts with a PROXY protocol header (v1 or v2: HAProxy send-proxy, send-proxy-v2) "
        "giving the real client address for limits, protected mode and logs; a connection from a peer outside "
        "proxy_allow_from, or without a valid header, is closed.",
        section="security", convert=parse_bool, flag=True)
    proxy_allow_from: list[str] = setting(
        ["127.0.0.1", "::1"], "Peers (addresses or CIDR networks, comma-separated; * for any) trusted to send the "
        "PROXY header; unix-socket peers are always trusted.",
        section="security", convert=_networks, metavar="NETWORKS")
    proxy_protocol_timeout: float = setting(
        5.0, "Seconds a connection has to send its whole PROXY header (0: no limit).",
        section="security", convert=float, validate=_positive)
    log_level: str = setting(
        "info", "Level of the geventtcp loggers.",
        section="logging", convert=lambda v: str(v).lower(), choices=("debug", "info", "warning", "error", "critical"))
    app_log_level: str = setting(
        "info", "Level of the root logger, which the application's loggers inherit: their records get the same "
        "handler and format as geventtcp's (stderr or log_file, reopened by SIGUSR1) unless log_config says otherwise.",
        section="logging", convert=lambda v: str(v).lower(), choices=("debug", "info", "warning", "error", "critical"))
    # -- operations (launcher, logging, introspection) ---------------------------------------
    timeout: float = setting(
        30.0, "Heartbeat timeout: a worker whose event loop is stuck this many seconds is killed (SIGABRT, then "
        "SIGKILL) and replaced (0: never).",
        section="process", convert=float, validate=_positive)
    reuse_port: bool = setting(
        False, "Give each worker its own SO_REUSEPORT listener per TCP address, so the kernel spreads connections "
        "evenly; but a worker stuck in CPU work strands the connections hashed to it (off: all workers accept from "
        "one shared socket).",
        section="process", convert=parse_bool, flag=True)
    max_requests: int = setting(
        0, "Requests a worker serves before it drains and is replaced (0: never).",
        section="process", convert=int, validate=_positive)
    max_requests_jitter: int = setting(
        0, "Random 0..N added to max_requests per worker, so workers do not restart together.",
        section="process", convert=int, validate=_positive)
    max_connection_age: float = setting(
        0.0, "Seconds after which a connection gets a goaway 'max_age' once idle, so clients move to new workers "
        "(0: never).",
        section="timeouts", convert=float, validate=_positive)
    max_connection_age_jitter: float = setting(
        0.1, "Fraction of max_connection_age added at random per connection.",
        section="timeouts", convert=float, validate=_positive)
    pidfile: str = setting("", "Write the master's pid to this file (removed on exit).", section="process")
    bind_file: str = setting(
        "", "Once every worker serves, write the bound addresses (port 0 made concrete, one HOST:PORT or unix:PATH "
        "per line) to this file, atomically, and remove it on exit; '-' prints them to stdout instead. For tools "
        "and tests that start a server on port 0.",
        section="process", metavar="PATH")
    log_file: str = setting(
        "", "Log to this file instead of stderr; SIGUSR1 reopens it (log rotation).",
        section="logging")
    access_log: bool = setting(
        False, "Log one line per request (peer, cmdid, id, code, duration) to the geventtcp.access logger.",
        section="logging", convert=parse_bool, flag=True)
    log_config: str = setting(
        "", "A logging.config.dictConfig file (.json, .toml or a Python file defining LOGGING_CONFIG); applied by "
        "each worker after it imported the application (so filters and formatters may be the application's), "
        "after the other logging settings; the master reads it at start but keeps the default handler.",
        section="logging")
    log_format: str = setting(
        "text", "Format of the log records geventtcp's handlers write: text (time, pid, level, logger, message and "
        "the request id of a record written inside a request) or json (one JSON object per line, with cmdid and "
        "request_id inside a request).",
        section="logging", choices=("text", "json"))
    tracing: str = setting(
        "auto", "OpenTelemetry: run each handler in a SERVER span, the child of the caller's trace context (auto: "
        "when opentelemetry-api is installed and a tracer provider is set when the server starts; off costs "
        "nothing).",
        section="logging", choices=("auto", "on", "off"))  # geventtcp.tracing.TRACING_MODES
    blocking_time: float = setting(
        0.1, "Log a warning naming the running cmdid when a handler blocks the event loop this many seconds (a "
        "heartbeat watcher thread; 0: off).",
        section="logging", convert=float, validate=_positive)
    metrics_bind: str = setting(
        "", "HOST:PORT where the master serves Prometheus text metrics aggregated over the workers (empty: off).",
        section="logging")


def _declaration(f: Field[Any]) -> Setting:
    factory = f.default_factory
    default = f.default if factory is MISSING else factory()
    return Setting(f.name, default, **f.metadata)


SETTINGS: tuple[Setting, ...] = tuple(_declaration(f) for f in fields(Settings))

_BY_NAME = {s.name: s for s in SETTINGS}


def _own(value: Any) -> Any:
    """A copy of a list value (``bind``), so no two Configs or Settings share one."""
    return list(value) if isinstance(value, list) else value


#: The lifecycle hooks (gunicorn's names, arguments and meaning), settable in a Python config file:
#: name -> the arguments each receives, by position (see :mod:`geventtcp.hooks` for what they are).
HOOKS: dict[str, tuple[str, ...]] = {
    "on_starting": ("server",),
    "when_ready": ("server",),
    "on_reload": ("server",),
    "pre_fork": ("server", "worker"),
    "post_fork": ("server", "worker"),
    "post_worker_init": ("worker",),
    "worker_int": ("worker",),
    "worker_abort": ("worker",),
    "worker_exit": ("server", "worker"),
    "on_exit": ("server",),
}
#: A hook function (its arguments: :data:`HOOKS`).
Hook = Callable[..., Any]

#: gunicorn settings and hooks geventtcp does not have (gunicorn 27's names minus ours): a gunicorn
#: config file that sets one is refused with its name, never half-applied. Value: what to use instead.
GUNICORN_ONLY: dict[str, str] = {
    **dict.fromkeys((
        "access_log_format", "asgi_disconnect_grace_period", "asgi_lifespan", "asgi_loop", "capture_output",
        "casefold_http_method", "chdir", "check_config", "child_exit", "ciphers", "config", "control_socket",
        "control_socket_disable", "control_socket_mode", "daemon", "default_proc_name", "dirty_apps",
        "dirty_graceful_timeout", "dirty_post_fork", "dirty_threads", "dirty_timeout", "dirty_worker_exit",
        "dirty_worker_init", "dirty_workers", "disable_redirect_access_to_syslog", "do_handshake_on_connect",
        "dogstatsd_tags", "enable_backlog_metric", "enable_stdio_inheritance", "forwarded_allow_ips",
        "forwarder_headers", "group", "header_map", "http2_cleartext", "http2_initial_window_size",
        "http2_max_concurrent_streams", "http2_max_frame_size", "http2_max_header_list_size", "http_parser",
        "http_protocols", "initgroups", "keepalive", "limit_request_field_size", "limit_request_fields",
        "logconfig_dict", "logconfig_json", "logger_class", "nworkers_changed", "on_dirty_starting", "paste",
        "permit_obsolete_folding", "permit_unconventional_http_method", "permit_unconventional_http_version",
        "post_request", "pre_exec", "pre_request", "preload_app", "print_config", "proc_name", "protocol",
        "pythonpath", "raw_env", "raw_paste_global_conf", "reload", "reload_engine", "reload_extra_files",
        "root_path", "secure_scheme_headers", "sendfile", "spew", "ssl_context", "ssl_version", "statsd_host",
        "statsd_prefix", "strip_header_spaces", "suppress_ragged_eofs", "syslog", "syslog_addr",
        "syslog_facility", "syslog_prefix", "threads", "tmp_upload_dir", "umask", "user", "uwsgi_allow_ips",
        "websocket_max_message_size", "worker_class", "worker_tmp_dir", "wsgi_app"), ""),
    "accesslog": "access_log",
    "errorlog": "log_file",
    "loglevel": "log_level",
    "logconfig": "log_config",
    "worker_connections": "max_connections",
    "limit_request_line": "max_line_bytes",
    "proxy_allow_ips": "proxy_allow_from",
    "cert_reqs": "tls_require_client_cert",
}


def check_hook(name: str, fn: Any) -> str | None:
    """Why ``fn`` cannot be hook ``name`` (not callable, or not callable with its arguments); None when it can."""
    params = HOOKS[name]
    if not callable(fn):
        return f"hook {name} must be a function, not {type(fn).__name__}"
    try:
        inspect.signature(fn).bind(*params)
    except TypeError:
        return f"hook {name} must take {len(params)} argument(s): {name}({', '.join(params)})"
    except ValueError:  # no signature to inspect (a builtin): trust it
        pass
    return None


@dataclass
class Config:
    """The resolver: each setting's value (``values``) and where it came from (``sources``: ``default``,
    ``file PATH``, ``env NAME``, ``command line``, ``argument``), filled in precedence order by
    :func:`load`; :meth:`freeze` gives the typed :class:`Settings` everything reads at run time.

    ``hooks``: the lifecycle hooks a Python config file defines (name -> function, :data:`HOOKS`);
    they are not settings (no flag, env var or TOML key), and a worker inherits them across fork.
    """

    values: dict[str, Any] = field(default_factory=lambda: {s.name: _own(s.default) for s in SETTINGS})
    sources: dict[str, str] = field(default_factory=lambda: {s.name: "default" for s in SETTINGS})
    hooks: dict[str, Hook] = field(default_factory=dict)

    def freeze(self) -> Settings:
        """The values as a :class:`Settings` (lists copied, so later changes here do not reach it)."""
        values: dict[str, Any] = {name: _own(value) for name, value in self.values.items()}
        return Settings(**values)

    def set(self, name: str, value: Any, source: str) -> None:
        declared = _BY_NAME.get(name)
        if declared is None:
            raise ConfigError(f"unknown setting {name!r} ({source}){_did_you_mean(name)}")
        self.values[name] = declared.coerce(value, source)
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
    """The settings of a config file: ``*.toml`` (top level or a ``[geventtcp]`` table) or a Python file."""
    return _read(path)[0]


def _read(path: str) -> tuple[dict[str, Any], dict[str, Hook]]:
    """A config file's settings and (a Python file's) hooks; :class:`ConfigError` names every name it
    refuses: unknown ones, gunicorn's that geventtcp lacks, hooks that cannot be called as documented."""
    hooks: dict[str, Hook] = {}
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
            data = data.get("geventtcp", data)
        else:
            data, hooks, functions = _python_names(runpy.run_path(path))
            _refuse_misspelled_hooks(path, functions)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError, SyntaxError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a table of settings")
    _refuse_unknown(path, data, hooks)
    return data, hooks


def _refuse_unknown(path: str, data: Mapping[str, Any], hooks: Mapping[str, Any]) -> None:
    problems = [f"{path}: {problem}" for name, fn in hooks.items() if (problem := check_hook(name, fn))]
    gunicorn = sorted(name for name in data if name in GUNICORN_ONLY)
    if gunicorn:
        named = ", ".join(name + (f" (use {GUNICORN_ONLY[name]})" if GUNICORN_ONLY[name] else "") for name in gunicorn)
        problems.append(f"{path} uses gunicorn setting(s) or hook(s) geventtcp does not have: {named}")
    in_toml = sorted(name for name in data if name in HOOKS)
    if in_toml:
        problems.append(f"hook(s) in {path}: {', '.join(in_toml)}: hooks are functions, set in a Python config file")
    unknown = sorted(set(data) - set(_BY_NAME) - set(GUNICORN_ONLY) - set(HOOKS))
    if unknown:
        problems.append(f"unknown setting(s) in {path}: {', '.join(n + _did_you_mean(n) for n in unknown)}")
    if problems:
        raise ConfigError("; ".join(problems))


def _python_names(namespace: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Hook], list[str]]:
    """The settings, hooks and other public functions of a Python config file. A hook is a function
    named as in :data:`HOOKS`; private names, modules, and other functions and classes are its own
    machinery (``import os``, ``def helper()``, ``_base = ...``), except a name gunicorn knows, which
    is kept to be refused; every other name must be a setting."""
    settings: dict[str, Any] = {}
    hooks: dict[str, Hook] = {}
    functions: list[str] = []
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if name in HOOKS:
            hooks[name] = value
        elif name in GUNICORN_ONLY or not callable(value):
            settings[name] = value
        elif inspect.isfunction(value):
            functions.append(name)
    return settings, hooks, functions


def _refuse_misspelled_hooks(path: str, functions: list[str]) -> None:
    """A function named almost as a hook (``worker_exti``) is a typo that would never run: an error."""
    if not functions:
        return
    import difflib  # only for a file with public functions: importing the package stays cheap

    typos = [f"{name} (did you mean {close[0]!r}?)" for name in functions
             if (close := difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.85))]
    if typos:
        raise ConfigError(f"function(s) in {path} named almost as a hook, which would never run: {', '.join(typos)}")


def _did_you_mean(name: str) -> str:
    """`` (did you mean 'workers'?)`` for a typo such as ``worker``; empty when nothing is close."""
    import difflib  # only on this error path: importing the package stays as cheap as it was

    close = difflib.get_close_matches(name, _BY_NAME, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load(cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         config_file: str | None = None) -> Config:
    """Resolve every setting from its sources, in precedence order; :class:`ConfigError` on bad input."""
    config = Config()
    if config_file:
        data, config.hooks = _read(config_file)
        config.update(data, f"file {config_file}")
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
