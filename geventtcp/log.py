"""Logging: the library's named loggers, the CLI's one-call setup, the request a record was written
in, the text and JSON formats, and the seed's ``BaseLogger``.

The CLI's setup (:func:`configure_logging`) makes one handler (stderr or ``--log-file``) and hangs it
on two loggers: ``geventtcp`` (at ``log_level``, ``propagate`` off, so the server's lines are written
once whatever the root logger holds) and the root logger (at ``app_log_level``), so the
application's loggers, which propagate to the root, write the same format to the same place and
are reopened by the same SIGUSR1. ``--log-config`` is applied by each worker after it imported the
application (:func:`apply_log_config`), so its filters and formatters may live there.

The request of a record: :func:`current_request` finds the request whose handler is running in the
calling greenlet, at the moment something logs, by looking up the stack for the server's dispatch
frame (registered with :func:`request_frame`) and reading its request. Nothing is stored per
request, so a server whose handlers log nothing pays nothing for it (``tests/test_call_budget.py``);
a record costs one walk over its stack (about 1 us, against the 5-10 us the record itself costs).
It works for a handler that runs inline and for one handed off to its own greenlet (the dispatch
frame stays below it); a greenlet the handler spawns, or a thread, is outside the request.
:class:`RequestFilter` puts ``cmdid`` and ``request_id`` (``meta["request_id"]``) on every record,
``None`` outside a request, for formats that name them; both formatters here find them themselves.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import sys
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from geventtcp.protocol import Request

__all__ = ["BaseLogger", "configure_logging", "server_log", "access_log", "apply_log_config", "load_log_config",
           "describe_chain", "reopen_log_files", "make_access_hook", "current_request", "request_frame",
           "RequestFilter", "TextFormatter", "JsonFormatter", "LOG_FORMATS"]

#: Lifecycle and errors of the server.
server_log = logging.getLogger("geventtcp.server")
#: One line per request when the access log is on.
access_log = logging.getLogger("geventtcp.access")

DEFAULT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
#: The text format of a record written inside a request that has a ``request_id``.
REQUEST_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s [%(request_id)s]: %(message)s"
#: The values of the ``log_format`` setting.
LOG_FORMATS = ("text", "json")

#: The functions that run a request's handler, as (code object, name of the local holding the
#: request) pairs (:func:`request_frame`). Matched by identity: hashing or comparing a code object
#: reads its whole bytecode.
_REQUEST_FRAMES: tuple[tuple[CodeType, str], ...] = ()


def request_frame(code: CodeType, local: str) -> None:
    """Declare that while a frame of ``code`` runs, its local ``local`` is the request being served
    (the server declares its dispatch function; see :func:`current_request`)."""
    global _REQUEST_FRAMES
    _REQUEST_FRAMES = (*_REQUEST_FRAMES, (code, local))


def current_request() -> Request | None:
    """The request whose handler (or middleware, or the server's own code for it) is running in the
    calling greenlet, or ``None`` (outside any request; in a greenlet or thread the handler started)."""
    frames = _REQUEST_FRAMES
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        for known, local in frames:
            if code is known:
                request: Request | None = frame.f_locals.get(local)
                return request
        frame = frame.f_back
    return None


def _request_fields(record: logging.LogRecord) -> tuple[int | None, str | None]:
    """The record's ``(cmdid, request_id)``: set by :class:`RequestFilter`, else looked up now."""
    fields = record.__dict__
    if "cmdid" in fields:
        return fields["cmdid"], fields.get("request_id")
    request = current_request()
    if request is None:
        return None, None
    return request.cmdid, request.meta.get("request_id")


class RequestFilter(logging.Filter):
    """Puts ``cmdid`` and ``request_id`` on each record (``None`` outside a request, or a request
    without a ``request_id`` in its meta), so that any format may name them; passes every record.

    Install it on a handler (filters of a logger do not see records of its children). A record that
    already has a ``cmdid`` attribute (``extra=``) keeps its own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "cmdid" not in record.__dict__:
            record.cmdid, record.request_id = _request_fields(record)
        return True


class TextFormatter(logging.Formatter):
    """geventtcp's text format (time, pid, level, logger, message), with ``[request_id]`` after the
    logger's name when the record was written inside a request that has one."""

    def __init__(self, fmt: str = DEFAULT_FORMAT, request_fmt: str = REQUEST_FORMAT) -> None:
        super().__init__(fmt)
        self._request_style = logging.PercentStyle(request_fmt)
        self._request_style.validate()

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        cmdid, request_id = _request_fields(record)
        if request_id is None:
            return super().formatMessage(record)
        record.request_id = request_id
        return self._request_style.format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (non-ASCII escaped, so a message cannot break a line):
    ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``pid``, ``logger``, ``message``, then
    ``exception`` (the traceback text) and ``stack`` when the record has them, and ``cmdid`` and
    ``request_id`` when it was written inside a request (``request_id`` when the request's meta has one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        cmdid, request_id = _request_fields(record)
        if cmdid is not None:
            entry["cmdid"] = cmdid
        if request_id is not None:
            entry["request_id"] = request_id
        return json.dumps(entry, default=str)


def make_formatter(log_format: str = "text") -> logging.Formatter:
    """The formatter of the ``log_format`` setting: ``text`` or ``json``."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure_logging(level: str = "info", log_file: str | None = None, app_level: str | None = None,
                      log_format: str = "text") -> None:
    """Send the ``geventtcp`` loggers to stderr (or ``log_file``) at ``level`` in ``log_format`` (text
    or json), each record with its request's ``cmdid``/``request_id`` (:class:`RequestFilter`);
    called by the CLI only.

    With ``app_level``, the root logger gets the same handler at that level, so the application's
    loggers (which propagate to it) are written alike. Importing the library configures nothing;
    applications embedding :class:`Server` keep control.
    """
    root = logging.getLogger("geventtcp")
    root.setLevel(level.upper())
    top = logging.getLogger()
    for logger in (root, top):
        for old in list(logger.handlers):
            if getattr(old, "_geventtcp_owned", False):
                logger.removeHandler(old)
                old.close()
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(RequestFilter())
    handler._geventtcp_owned = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False
    if app_level is not None:
        top.setLevel(app_level.upper())
        top.addHandler(handler)  # the same object: written in one format, reopened once on USR1


def load_log_config(path: str) -> dict[str, Any]:
    """Read the ``logging.config.dictConfig`` mapping in ``path``: ``.json``, ``.toml``, or a Python file
    defining ``LOGGING_CONFIG``; raises :class:`geventtcp.ConfigError` when it cannot be read.

    The master calls it at start (a file that cannot be read stops it at once); it imports nothing
    named in the mapping, which only :func:`apply_log_config` resolves.
    """
    import json
    import runpy
    import tomllib

    from geventtcp.errors import ConfigError

    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        elif path.endswith(".toml"):
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        else:
            data = runpy.run_path(path).get("LOGGING_CONFIG")
        if not isinstance(data, dict):
            raise ValueError("no dictConfig mapping found (a Python file must define LOGGING_CONFIG)")
    except Exception as exc:  # noqa: BLE001 - a Python config file may raise anything; the cause is the message
        raise ConfigError(f"log_config {path}: {describe_chain(exc)}") from exc
    data.setdefault("version", 1)
    data.setdefault("disable_existing_loggers", False)
    return data


def apply_log_config(path: str) -> None:
    """Read (:func:`load_log_config`) and apply the dictConfig in ``path``; raises
    :class:`geventtcp.ConfigError` whose message ends with the underlying cause (dictConfig's
    "Unable to configure filter 'x'" alone hides *why*, e.g. ``No module named 'app'``).

    Call it where the classes it names are importable: a worker calls it after importing the application.
    """
    from geventtcp.errors import ConfigError

    data = load_log_config(path)
    try:
        logging.config.dictConfig(data)
    except Exception as exc:  # noqa: BLE001 - a filter or handler class of the application may raise anything
        raise ConfigError(f"log_config {path}: {describe_chain(exc)}") from exc


def describe_chain(exc: BaseException) -> str:
    """``exc``'s message followed by its causes' (``A: B: ModuleNotFoundError: C``), repeats left out."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current) or type(current).__name__
        nxt = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if parts and text in parts[-1]:  # "Cannot resolve 'x': No module named 'x'" already says it
            pass
        elif nxt is None and current is not exc:
            parts.append(f"{type(current).__name__}: {text}")  # the root cause, with its kind
        else:
            parts.append(text)
        current = nxt
    return ": ".join(parts)


def reopen_log_files() -> int:
    """Reopen every ``logging.FileHandler`` (after logrotate moved the file, on SIGUSR1); returns how many."""
    seen: set[int] = set()
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                        if isinstance(v, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and id(handler) not in seen:
                seen.add(id(handler))
                with handler.lock:  # type: ignore[union-attr]
                    if handler.stream is not None:
                        handler.stream.close()
                    handler.stream = handler._open()
    return len(seen)


class Peer(Protocol):
    """What the access log reads of a connection: its peer address (a tuple, or a unix path)."""

    address: Any


def make_access_hook() -> Callable[[Peer, Request, int, float], None]:
    """The ``Server.access_log`` hook writing one line per request to ``geventtcp.access``.

    Format: ``PEER cmdid=N id=ID code=C DURATIONms``. The server calls it only when it is set, so an
    access log that is off costs nothing per request.
    """
    info = access_log.info

    def hook(conn: Peer, req: Request, code: int, seconds: float) -> None:
        peer = conn.address
        if isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        # The id comes from the client: %r keeps newlines and escape sequences out of the log.
        info("%s cmdid=%d id=%s code=%d %.3fms", peer or "unix", req.cmdid,
             repr(req.id) if req.has_id else "-", code, seconds * 1000.0)

    return hook


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
