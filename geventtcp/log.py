"""Logging: the library's named loggers, the CLI's one-call setup, and the seed's ``BaseLogger``."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = ["BaseLogger", "configure_logging", "server_log", "access_log"]

#: Lifecycle and errors of the server.
server_log = logging.getLogger("geventtcp.server")
#: One line per request when the access log is on.
access_log = logging.getLogger("geventtcp.access")

DEFAULT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info", log_file: str | None = None) -> None:
    """Send the ``geventtcp`` loggers to stderr (or ``log_file``) at ``level``; called by the CLI only.

    Importing the library configures nothing; applications embedding :class:`Server` keep control.
    """
    root = logging.getLogger("geventtcp")
    root.setLevel(level.upper())
    for old in list(root.handlers):
        if getattr(old, "_geventtcp_owned", False):
            root.removeHandler(old)
            old.close()
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(DEFAULT_FORMAT))
    handler._geventtcp_owned = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False


class BaseLogger:
    """SCTornadoTCP's per-handler logger, on the standard ``logging`` module.

    Subclass and set ``logger_name``, ``logger_level``, ``logger_format_file``,
    ``logger_format_console`` and ``logger_path``; instantiating the subclass configures that named
    logger, and only it, to write to its own file and to the console (once, however many instances
    are made). The instance forwards ``debug``/``info``/``warning``/``error``/``exception``/
    ``critical`` to the logger. Unlike the seed (``logging.basicConfig``, so only the first file
    ever took effect), every subclass gets its own file.
    """

    logger_name = "geventtcp.app"
    logger_level: int | str = logging.INFO
    logger_format_file = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logger_format_console = "%(levelname)s %(name)s: %(message)s"
    #: Log file path; ``None`` or empty for console only.
    logger_path: str | None = None
    #: Set False to skip the console handler.
    logger_console = True

    def __init__(self) -> None:
        self.logger = logging.getLogger(self.logger_name)
        self.logger.setLevel(self.logger_level)
        configured = {getattr(h, "_baselogger_key", None) for h in self.logger.handlers}
        if self.logger_path:
            path = os.path.abspath(self.logger_path)
            key = ("file", path)
            if key not in configured:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                file_handler = logging.FileHandler(path)
                file_handler.setFormatter(logging.Formatter(self.logger_format_file))
                file_handler._baselogger_key = key  # type: ignore[attr-defined]
                self.logger.addHandler(file_handler)
        if self.logger_console and ("console", None) not in configured:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter(self.logger_format_console))
            console._baselogger_key = ("console", None)  # type: ignore[attr-defined]
            self.logger.addHandler(console)
        self.logger.propagate = False

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.debug(msg, *args, **kwargs)

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.info(msg, *args, **kwargs)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.warning(msg, *args, **kwargs)

    warn = warning

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.error(msg, *args, **kwargs)

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.exception(msg, *args, **kwargs)

    def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.critical(msg, *args, **kwargs)
