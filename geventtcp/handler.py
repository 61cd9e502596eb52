"""The handler base class: one instance per request, ``process(request)`` returns the reply's data."""

from __future__ import annotations

import logging
from typing import Any

from geventtcp.protocol import Request

__all__ = ["BaseHandler", "SeedReply"]


class BaseHandler:
    """Subclass and implement :meth:`process`; register with ``@urls.handler(cmdid)``.

    A new instance serves each request, so instance attributes never leak between requests.
    ``process`` runs as plain blocking code in the connection's greenlet: ``time.sleep``, sockets and
    blocking client libraries yield to other connections because the server monkey-patches first.

    The reply's ``data`` is what ``process`` returns; when it returns ``None`` the value of
    ``self.res`` is used instead (SCTornadoTCP handlers set ``self.res``). A seed handler that put
    its whole reply line in ``self.res`` (a str or bytes holding a JSON object with an integer
    ``code``) is answered with that object, not with it as ``data``: see :class:`SeedReply`. Raise
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


class SeedReply:
    """Returned by the registry's call of a :class:`BaseHandler` whose ``process`` returned ``None``
    with text that starts with ``{`` in ``self.res`` (a ``str`` or ``bytes``): SCTornadoTCP wrote
    ``res`` to the stream as is, so a seed handler may hold its whole reply line there, e.g.
    ``json.dumps({"code": 0, ...}) + "\\n"``.

    A value, not an exception: middleware and Flask's hooks see a seed handler's answer as what it
    is, the handler's successful result (``after_request`` runs and gets this object; a
    ``teardown_request`` gets ``None``). The server's request path pays nothing for it: a
    ``SeedReply`` has no JSON form, so encoding it fails and only that rare path
    (:meth:`geventtcp.server.connection.Connection._unencodable`) looks at it and decides, with the
    server's codec, what ``text`` is (the rule is in docs/migrating.md):

    * a JSON object (one value, any JSON whitespace, newlines included, around or inside it) with
      an integer ``code``: the reply is that object, re-encoded on one line, ``id`` set to the
      request's (removed when the request had none), ``cmdid`` added when it has none. ``code`` 0
      is a success; 400 or an application code (1000+) an error reply that says the handler ran;
      any other code (a transport code such as 503, which a client reads as "not processed", or
      a code of the seed's own) is answered 500 ``internal error`` and logged, as a
      :class:`geventtcp.HandlerError` with such a code would be;
    * anything else: ``text`` is the reply's ``data``, as for any other ``res``.
    """

    __slots__ = ("text",)

    def __init__(self, text: str | bytes) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"SeedReply({self.text!r})"
