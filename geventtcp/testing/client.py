"""The in-process test client: a real :class:`~geventtcp.server.Server` in a thread of its own, called by a real Client.

:class:`TestClient` runs the application's registry in a real ``Server`` (bound to 127.0.0.1, port 0)
whose gevent hub lives in a dedicated OS thread, and calls it with a real
:class:`~geventtcp.client.Client`. So every call takes the whole request path a deployed server
takes (the codec, ``parse_request``, the server's call table as ``Server.start`` builds it, with
whatever it composes into it, the admission limits, deadlines, error mapping and the built-ins
PING, LIST and STATS) and comes back as a client sees it: the data, or the client exception class
``Client.call`` raises, with its ``code``, ``msg`` and ``details``. :meth:`TestClient.reply` returns
the decoded reply object instead, error replies included.

Why a thread of its own: a server embedded in the test's own hub answers only while that hub runs,
that is while the calling thread waits in gevent. A call from another thread (a thread pool, a
framework's worker) then waits on a plain socket while the server's hub, in the blocked main
thread, never runs: a deadlock. Here the server's hub always runs, so a call may come from any
thread, from any number of greenlets, monkey-patched or not. Each request runs in a fresh copy of
the server's base context (as in a deployed worker), so a ``contextvars.ContextVar`` one request
sets is never seen by another, concurrent or not.

What differs from a deployed worker, and how it fails: handlers run in the server's thread, not
in the test's; without monkey-patching ``threading.local`` is one object for all the requests
that thread serves (a deployed, patched worker has one per greenlet), so per-request state belongs
in a ContextVar (see ``docs/testing.md``). A handler's exception is logged by the server and
answered 500, exactly as deployed. A server that cannot start (a bad setting, an import error)
raises from the constructor.

The application's worker lifecycle hooks (``@registry.hook("post_worker_init")``/``"worker_exit"``)
run in the server's thread, as a worker runs them, so per-worker resources they open (a database
pool, a cache client) exist while a test calls and are closed by :meth:`TestClient.close`.

Who closes what: the TestClient owns the Client, the Server and its thread; :meth:`TestClient.close`
(or leaving ``with``) closes the client's connections first, so the server's drain does not wait
for them, then stops the server (gracefully, bounded) and joins the thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from gevent import monkey

from geventtcp.client.client import Client
from geventtcp.client.concurrency import current_world, real_lock
from geventtcp.client.replycodec import ReplyCodec
from geventtcp.codec import get_codec
from geventtcp.config import HOOKS
from geventtcp.errors import ConnectError, remote_error
from geventtcp.hooks import MasterInfo, WorkerInfo, run_hooks
from geventtcp.protocol import MAX_TIMEOUT_MS, Builtin, encode_request
from geventtcp.urls import Registry, load_registry

__all__ = ["TestClient"]

#: The real ``_thread.start_new_thread``, even in a monkey-patched process: the server needs an OS
#: thread (and so a hub) of its own; a patched "thread" would be a greenlet of the caller's hub.
_start_new_thread: Any = monkey.get_original("_thread", "start_new_thread")
_get_native_id: Any = monkey.get_original("_thread", "get_native_id")
#: How long the constructor waits for the server's thread to bind and start.
START_TIMEOUT = 30.0


class _ServerThread:
    """A Server and the OS thread whose hub runs it; ``start()`` returns once it listens (or raises).

    With ``worker_hooks``, the registry's ``post_worker_init`` hooks run in that thread once the
    Server is built, before it listens (a failure is the constructor's :class:`HookFailedError`), and
    its ``worker_exit`` hooks run there after every end that followed them (drained, or a boot
    error), while the hub still runs: as in a deployed worker, which is this thread's one "worker".
    """

    def __init__(self, registry: Registry, settings: dict[str, Any], worker_hooks: bool, app: str) -> None:
        self.registry = registry
        self.settings = settings
        self.worker_hooks = worker_hooks
        self.app = app
        self.exit_reason = ""
        self.server: Any = None
        self.error: BaseException | None = None
        self.native_id = 0  # the thread's id in the OS, once it runs
        self._ready = real_lock()  # released once the server listens or failed to
        self._done = real_lock()  # released when the thread has ended
        self._ready.acquire()
        self._done.acquire()

    def start(self) -> None:
        _start_new_thread(self._run, ())
        if not self._ready.acquire(True, START_TIMEOUT):
            raise TimeoutError(f"the test server did not start within {START_TIMEOUT:g}s")
        if self.error is not None:
            self._done.acquire(True, START_TIMEOUT)  # the thread ends at once: nothing outlives the failure
            raise self.error

    def _run(self) -> None:
        from gevent import get_hub

        from geventtcp.server.server import Server

        self.native_id = _get_native_id()
        hooked = False  # post_worker_init began: worker_exit runs at the end, as in a worker
        try:
            try:
                self.server = Server(self.registry, **self.settings)  # its loop: this thread's hub
                if self.worker_hooks and self.registry.hooks("post_worker_init"):
                    hooked = True
                    self._run_hooks("post_worker_init", abort=True)
                self.server.start()
            except BaseException as exc:
                self.error = exc
                self.exit_reason = "boot_error"
                return
            finally:
                self._ready.release()
            self.server.serve_forever()  # until stop() or close(), from another thread (see stop)
            self.exit_reason = "shutdown"
        finally:
            try:
                if hooked or (self.worker_hooks and self.server is not None and self.error is None):
                    self._run_hooks("worker_exit")  # logged on failure, like a worker's
            finally:
                get_hub().destroy(destroy_loop=True)  # this thread's hub and loop, with their descriptors
                self._done.release()

    def _run_hooks(self, name: str, abort: bool = False) -> None:
        """The registry's hooks ``name`` with what a worker passes (:mod:`geventtcp.hooks`): this
        process as the master and as worker 1 in slot 0 of generation 0."""
        hooks = self.registry.hooks(name)
        if not hooks:
            return
        pid, settings = os.getpid(), self.server.settings
        logger = logging.getLogger("geventtcp.testing")
        worker = WorkerInfo(pid, age=1, slot=0, generation=0, settings=settings, log=logger,
                            exit_reason=self.exit_reason or ("shutdown" if name == "worker_exit" else ""))
        if len(HOOKS[name]) == 2:  # (server, worker)
            run_hooks(name, hooks, MasterInfo(pid, self.app, settings, 1, 0, logger), worker, abort=abort)
        else:
            run_hooks(name, hooks, worker, abort=abort)

    def stop(self, timeout: float) -> None:
        """Drain gracefully (at most ``timeout`` s) from any thread; returns once the thread ended.

        The stop runs in a greenlet of the server's hub (``run_callback_threadsafe`` wakes that
        loop): a hub callback itself must not wait, and only that hub may touch the server.
        """
        import gevent

        server = self.server
        if server is None or self._done.acquire(False):  # never started, or already ended
            return
        server.loop.run_callback_threadsafe(gevent.spawn, server.stop, timeout)
        if not self._done.acquire(True, timeout + 10.0):
            raise TimeoutError(f"the test server's thread did not end within {timeout + 10.0:g}s")


class TestClient:
    """Call an application's handlers through the real request path, in this process.

    ``TestClient(app, **settings)``: ``app`` is a :class:`~geventtcp.urls.Registry` or an app spec
    as ``geventtcp serve`` takes it (``"module"`` or ``"module:attr"``); ``settings`` are server
    settings (:mod:`geventtcp.config`, e.g. ``handler_timeout=2``, ``auth_token="s"``); ``bind``
    defaults to ``127.0.0.1:0``. ``client_options`` go to the :class:`~geventtcp.client.Client`
    (its ``retries`` default to 0 here, so a test sees each reply as the server sent it, a 503
    included, and a handler runs once per call).

    The application's worker hooks (``@registry.hook``) run as in a deployed worker, in the server's
    thread: ``post_worker_init`` before the server listens (one that raises fails the constructor
    with :class:`~geventtcp.hooks.HookFailedError`), ``worker_exit`` when :meth:`close` has drained
    it (and after a failed start that ran ``post_worker_init``), so the per-worker resources they
    open and close (a database pool) exist while the test calls. ``worker_hooks=False`` leaves them
    out (a test that puts fakes in their place). ``worker_int`` and ``worker_abort`` never run here.

    Use it with ``with TestClient(app) as tc: tc.call(cmdid, params)``; safe from any thread and
    greenlet. ``address`` is the server's ``HOST:PORT``, ``server`` the running Server (read it,
    e.g. ``server.stats``; change it only from its own thread).
    """

    __test__ = False  # a class named Test*: not a test case for pytest

    def __init__(self, app: Registry | str, *, client_options: Mapping[str, Any] | None = None,
                 worker_hooks: bool = True, **settings: Any) -> None:
        registry = app if isinstance(app, Registry) else load_registry(app)
        settings.setdefault("bind", "127.0.0.1:0")
        self._thread = _ServerThread(registry, settings, worker_hooks, app if isinstance(app, str) else repr(app))
        self._thread.start()
        self.server: Any = self._thread.server
        try:
            host, port = self.server.address[:2]
            self.address = f"{host}:{port}"
            options = {"retries": 0, **(client_options or {})}
            token = self.server.token
            if token is not None:
                options.setdefault("auth_token", token)
            self.client = Client(self.address, **options)
            self._reply_codec = ReplyCodec(get_codec(self.server.settings.codec))
        except BaseException:  # a client option the Client refuses: no server thread outlives the failure
            self._thread.stop(0)
            raise
        self._ids = itertools.count(1)
        self.closed = False

    def __repr__(self) -> str:
        return f"<TestClient {self.address}{' closed' if self.closed else ''}>"

    def __enter__(self) -> TestClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def call(self, cmdid: int, params: Any = None, *, meta: Any = None, timeout: float | None = None,
             **options: Any) -> Any:
        """What ``Client.call(cmdid, params, ...)`` returns or raises: the reply's data, or the
        :class:`~geventtcp.errors.RemoteError` subclass of its code (``code``, ``msg``, ``details``).

        ``meta`` (request metadata) and any other keyword go to ``Client.call`` as they are; ``meta``
        only when given, so this works with a Client that has no such parameter as long as none is.
        """
        if meta is not None:
            options["meta"] = meta
        return self.client.call(cmdid, params, timeout, **options)

    def reply(self, cmdid: int, params: Any = None, *, meta: Any = None, timeout: float | None = None,
              id: Any = None) -> dict[str, Any]:
        """Send one request line on a connection of its own; the reply object as decoded by the client
        (``{"code": 0, "cmdid": .., "data": .., "id": ..}``, or ``code``, ``msg`` and maybe ``details``).

        Error codes do not raise here; transport failures do (:class:`ConnectError`, ``TimeoutError``).
        ``meta`` is written as the line's top-level ``meta`` object; ``id`` defaults to a counter.
        """
        seconds = self.client.timeout if timeout is None else timeout
        line = encode_request(self._reply_codec, cmdid, params, next(self._ids) if id is None else id,
                              timeout_ms=min(int(seconds * 1000), MAX_TIMEOUT_MS))
        if meta is not None:
            line = line[:-2] + b',"meta":' + self._reply_codec.dumps(meta) + b"}\n"
        deadline = time.monotonic() + seconds
        sock = current_world("auto").connect(self.address, seconds)
        try:
            if self.server.token is not None:
                auth = self._exchange(sock, encode_request(self._reply_codec, Builtin.AUTH,
                                                           {"token": self.server.token}), deadline)
                if auth["code"]:
                    raise remote_error(auth)
            return self._exchange(sock, line, deadline)
        finally:
            sock.close()

    def _exchange(self, sock: Any, line: bytes, deadline: float) -> dict[str, Any]:
        """Write ``line`` and read one reply line before ``deadline``."""
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(line)
        received = b""
        while b"\n" not in received:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectError(f"the test server at {self.address} closed the connection without a reply")
            received += chunk
        return self._reply_codec.reply(received[: received.index(b"\n") + 1])

    def ping(self) -> Any:
        return self.call(Builtin.PING)

    def list(self) -> Any:
        return self.call(Builtin.LIST)

    def stats(self) -> Any:
        return self.call(Builtin.STATS)

    def close(self, timeout: float = 5.0) -> None:
        """Close the client's connections, then stop the server (drained within ``timeout`` s) and its thread."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self._thread.stop(timeout)
