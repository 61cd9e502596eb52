"""Logging: the seed's BaseLogger gives each subclass its own file; importing configures nothing."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from geventtcp import BaseLogger
from geventtcp.log import configure_logging


def test_each_base_logger_subclass_writes_its_own_file(tmp_path: Path) -> None:
    class OrdersLogger(BaseLogger):
        logger_name = "test.orders"
        logger_path = str(tmp_path / "orders.log")
        logger_console = False

    class UsersLogger(BaseLogger):
        logger_name = "test.users"
        logger_level = "DEBUG"
        logger_path = str(tmp_path / "logs" / "users.log")
        logger_format_file = "%(levelname)s|%(message)s"
        logger_console = False

    OrdersLogger().info("order %d", 1)
    UsersLogger().debug("user %s", "ann")
    OrdersLogger().warning("order %d", 2)  # a second instance adds no second handler
    for handler in logging.getLogger("test.orders").handlers + logging.getLogger("test.users").handlers:
        handler.flush()
    orders = (tmp_path / "orders.log").read_text().splitlines()
    assert len(orders) == 2 and "order 1" in orders[0] and "WARNING" in orders[1]
    assert (tmp_path / "logs" / "users.log").read_text() == "DEBUG|user ann\n"
    assert len(logging.getLogger("test.orders").handlers) == 1


def test_base_logger_console_output(capsys: object) -> None:
    class ConsoleLogger(BaseLogger):
        logger_name = "test.console"
        logger_format_console = "C:%(message)s"

    ConsoleLogger().error("visible")
    assert "C:visible" in capsys.readouterr().err  # type: ignore[attr-defined]


@pytest.mark.subprocess
def test_importing_the_library_configures_no_logging() -> None:
    code = ("import logging, geventtcp, handlers; "
            "print(len(logging.getLogger().handlers), len(logging.getLogger('geventtcp').handlers))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["0", "0"], out.stderr


def test_configure_logging_replaces_only_its_own_handler(tmp_path: Path) -> None:
    root = logging.getLogger("geventtcp")
    before = list(root.handlers)
    try:
        configure_logging("warning", str(tmp_path / "a.log"))
        configure_logging("debug", str(tmp_path / "b.log"))
        owned = [h for h in root.handlers if getattr(h, "_geventtcp_owned", False)]
        assert len(owned) == 1 and root.level == logging.DEBUG
        logging.getLogger("geventtcp.server").debug("hello")
        owned[0].flush()
        assert "hello" in (tmp_path / "b.log").read_text()
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()
        root.propagate = True
        root.setLevel(logging.NOTSET)


def test_application_loggers_share_the_handler_at_their_own_level(tmp_path: Path) -> None:
    """The root gets geventtcp's handler at app_level; geventtcp's lines are written once, at log_level."""
    top, ours = logging.getLogger(), logging.getLogger("geventtcp")
    saved = (list(top.handlers), top.level, list(ours.handlers))
    try:
        configure_logging("debug", str(tmp_path / "a.log"), "warning")
        logging.getLogger("myapp.orders").info("app info")  # below app_level
        logging.getLogger("myapp.orders").warning("app warning")
        logging.getLogger("geventtcp.server").debug("server debug")  # geventtcp keeps its own level
        configure_logging("info", str(tmp_path / "b.log"), "info")  # a second call replaces, never adds
        assert [h for h in top.handlers if getattr(h, "_geventtcp_owned", False)] == \
               [h for h in ours.handlers if getattr(h, "_geventtcp_owned", False)]
        logging.getLogger("myapp").info("app info 2")
        logging.shutdown()
        first = (tmp_path / "a.log").read_text()
        assert "app info" not in first and first.count("app warning") == 1 and first.count("server debug") == 1
        assert " WARNING myapp.orders: app warning" in first and "] " in first  # time [pid] LEVEL name
        assert (tmp_path / "b.log").read_text().count("app info 2") == 1
    finally:
        for logger in (top, ours):
            for h in list(logger.handlers):
                if getattr(h, "_geventtcp_owned", False):
                    logger.removeHandler(h)
                    h.close()
        top.setLevel(saved[1])
        ours.propagate = True
        ours.setLevel(logging.NOTSET)
