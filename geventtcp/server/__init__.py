"""The server side: a :class:`Server` serves a registry's handlers on listeners, one greenlet per
connection (``connection``) sharing the server's ``state``, parking idle ones (``readers``), with the
built-in commands, AUTH and protected mode (``builtins``, ``security``), counters (``stats``) and the
blocking detector.

Imports the foundation only, never :mod:`geventtcp.client`; only :mod:`geventtcp.launcher`,
:mod:`geventtcp.cli` and :mod:`geventtcp.gunicorn_worker` import it.
"""

from geventtcp.server.server import Server

__all__ = ["Server"]
