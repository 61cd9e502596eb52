"""The ``geventtcp`` command line: ``main`` builds the parser from the verb modules (``ops``,
``call``, ``bench`` with its load generator ``loadgen``) and their shared TLS/AUTH ``options``.
"""

from geventtcp.cli.main import main

__all__ = ["main"]
