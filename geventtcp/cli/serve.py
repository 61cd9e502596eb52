"""The ``serve`` verb: validate the settings, then run the launcher (:mod:`geventtcp.launcher`) for an app.

The master neither monkey-patches nor imports the application (each worker does both right after
fork), so everything heavy is imported inside the verb, after argument parsing.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from geventtcp.cli.commands import command

if TYPE_CHECKING:
    from geventtcp.config import Settings

__all__: list[str] = []


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from geventtcp.config import add_arguments

    parser.add_argument("app", help="module (or module:attr) whose handlers to serve, e.g. 'handlers'")
    parser.add_argument("-c", "--config", dest="config_file", metavar="FILE",
                        help="config file: TOML, or Python assignments (env GEVENTTCP_CONFIG)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the settings and import the application, then exit (0: fine, 1: not)")
    parser.add_argument("--print-config", action="store_true",
                        help="print every setting's resolved value and where it came from, then exit")
    add_arguments(parser)


@command("serve", "run a server for an application's handlers", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    # The master neither monkey-patches nor imports the application: each worker does both right
    # after fork (patching first, so plain blocking handler code yields), and HUP re-imports.
    from geventtcp.config import Config, load
    from geventtcp.errors import ConfigError

    config_file = args.config_file or os.environ.get("GEVENTTCP_CONFIG")

    def resolve() -> Config:
        return load(vars(args), config_file=config_file)

    try:
        config = resolve()
    except ConfigError as exc:
        print(f"geventtcp: {exc}", file=sys.stderr)
        return 1 if args.check_config else 2
    if args.print_config:
        width = max(len(name) for name in config.values)
        for name, value in config.values.items():
            shown = "'<hidden>'" if name == "auth_token" and value else repr(value)  # a secret stays one
            print(f"{name:<{width}} = {shown}  # {config.sources[name]}")
        for name, hook in config.hooks.items():
            print(f"{name:<{width}} = {getattr(hook, '__qualname__', hook)}  # hook, file {config_file}")
        return 0
    if args.check_config:
        return _check_config(args.app, config.freeze(), sorted(config.hooks))
    from geventtcp.log import configure_logging, load_log_config

    settings = config.freeze()
    configure_logging(settings.log_level, settings.log_file or None, settings.app_log_level, settings.log_format)
    try:
        if settings.log_config:
            # Only read here: the classes it names may be the application's, which the master never
            # imports (that would import it unpatched, and every fork would inherit it past a HUP).
            load_log_config(settings.log_config)
        from geventtcp.launcher.arbiter import Arbiter

        return Arbiter(args.app, config, reload_config=resolve).run()
    except (ConfigError, OSError) as exc:
        print(f"geventtcp: {exc}", file=sys.stderr)
        return 2


def _bind_addresses(binds: list[str]) -> list[Any]:
    """What the listeners of ``binds`` would report as ``getsockname()``, without binding (names resolved)."""
    import socket

    from geventtcp.sockets import parse_address

    addresses: list[Any] = []
    for text in binds:
        family, address = parse_address(text)
        if family == socket.AF_UNIX:
            addresses.append(address)
            continue
        infos = socket.getaddrinfo(address[0], address[1], family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        addresses.extend(info[4][:2] for info in infos)
    return addresses


def _check_config(app: str, settings: Settings, file_hooks: list[str]) -> int:
    """Validate as ``serve`` would (addresses, auth, TLS, protected mode), then import the application
    as a worker would (patched first) and report what it registers (commands, hooks). Binds nothing.
    (The config file's hooks were checked when it was read: name, gunicorn's, signature.)"""
    from gevent import monkey

    monkey.patch_all()
    from geventtcp.log import apply_log_config
    from geventtcp.server.security import check_serving_settings
    from geventtcp.urls import load_registry

    try:
        metrics = _bind_addresses([settings.metrics_bind]) if settings.metrics_bind else []
        check_serving_settings(settings, _bind_addresses(settings.bind), metrics)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        registry = load_registry(app)
        if settings.log_config:  # as a worker does: after the application, whose classes it may name
            apply_log_config(settings.log_config)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the answer to "is it valid?"
        print(f"geventtcp: configuration check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    from geventtcp.hooks import APP_HOOKS

    hooks = [f"{name} (config file)" for name in file_hooks]
    hooks += [f"{name} (application) x{len(registry.hooks(name))}" for name in APP_HOOKS if registry.hooks(name)]
    print(f"configuration OK: {app} registers {len(registry)} command(s); hooks: {', '.join(hooks) or 'none'}")
    return 0
