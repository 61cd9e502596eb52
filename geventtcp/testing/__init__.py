"""Testing an application's handlers: in process (:class:`TestClient`) or in a served subprocess (:class:`AppServer`).

:class:`TestClient` calls the handlers through the real request path in this process (a real
Server in a thread of its own, a real Client); :class:`AppServer` runs ``geventtcp serve`` in a
subprocess, monkey-patched workers and all, and hands out a Client. The pytest fixtures built on
both live in :mod:`geventtcp.testing.pytest_plugin`, which a project enables itself
(``pytest_plugins = ["geventtcp.testing.pytest_plugin"]`` in its ``conftest.py``); importing this
package does not import pytest. Guide: ``docs/testing.md``.
"""

from __future__ import annotations

from geventtcp.testing.client import TestClient
from geventtcp.testing.process import AppServer, ServerFailed

__all__ = ["AppServer", "ServerFailed", "TestClient"]
