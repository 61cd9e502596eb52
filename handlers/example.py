"""Example handlers: echo, sleep, fail, and the seed's TestHandler, written as SCTornadoTCP ones are."""

import time
from typing import Any

from geventtcp import BaseHandler, BaseLogger, HandlerError, Request, urls

from .cmdids import CmdId


class TestLogger(BaseLogger):
    """The seed-style logger of TestHandler: its own file (when logger_path is set) and the console."""

    logger_name = "handlers.test"
    logger_path = None


@urls.handler(CmdId.ECHO, idempotent=True)
class Echo(BaseHandler):
    """Reply with the request's params."""

    def process(self, request: Request) -> dict[str, Any]:
        return request.params


@urls.handler(CmdId.SLEEP, idempotent=True)
class Sleep(BaseHandler):
    """Sleep params["seconds"] (blocking-style time.sleep, cooperative under monkey-patching), then reply."""

    def process(self, request: Request) -> dict[str, Any]:
        seconds = request.params.get("seconds", 0)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds <= 3600:
            raise HandlerError("params.seconds must be a number from 0 to 3600")
        time.sleep(seconds)
        return {"slept": seconds}


@urls.handler(CmdId.FAIL)
class Fail(BaseHandler):
    """Always raise: shows that a handler error becomes a 500 reply and the connection lives on."""

    def process(self, request: Request) -> None:
        raise RuntimeError("this handler always fails")


@urls.handler(CmdId.TEST)
class TestHandler(BaseHandler):
    """The seed's TestHandler: log the params through its own logger and reply code 0."""

    def process(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise TypeError
        TestLogger().info("params: %s", request.params)
        self.res = {"received": True}
