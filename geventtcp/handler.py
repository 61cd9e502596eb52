"""The handler base class: one instance per request, ``process(request)`` returns the reply's data."""

from __future__ import annotations

import logging
from typing import Any

from geventtcp.protocol import Request

__all__ = ["BaseHandler"]


class BaseHandler:
    """Subclass and implement :meth:`process`; register with ``@urls.handler(cmdid)``.

    A new instance serves each request, so instance attributes never leak between requests.
    ``process`` runs as plain blocking code in the connection's greenlet: ``time.sleep``, sockets and
    blocking client libraries yield to other connections because the server monkey-patches first.

    The reply's ``data`` is what ``process`` returns; when it returns ``None`` the value of
    ``self.res`` is used instead (SCTornadoTCP handlers set ``self.res``). Raise
    :class:`geventtcp.HandlerError` (or an application error class such as ``NotFound``) to reply
    with 400 or an application code and optional ``details``; any other exception is logged with
    its traceback and answered with code 500.
    """

    #: Set by SCTornadoTCP-style handlers instead of returning a value.
    res: Any = None
    #: Logger for this handler's own messages; override per class (or use a BaseLogger).
    logger: logging.Logger = logging.getLogger("geventtcp.handler")
    #: Declare True when running the command twice has the same effect as once; clients may then
    #: retry it after a connection loss.
    idempotent: bool = False
    #: Declare True to have :class:`geventtcp.RequestCancelled` thrown into ``process`` when the
    #: client is gone (see ``Request.cancelled``); the default lets it run to the end.
    cancel_on_disconnect: bool = False

    def process(self, request: Request) -> Any:
        """Handle one request and return the reply data (or set ``self.res``)."""
        raise NotImplementedError(f"{type(self).__name__}.process is not implemented")
