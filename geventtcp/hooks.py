"""Lifecycle hooks: what they receive and how they are run (gunicorn's server hooks, by name and meaning).

A hook is a function, set in the Python config file (``def worker_exit(server, worker): ...``, see
:data:`geventtcp.config.HOOKS`) or, for the hooks that run in a worker once the application is
imported (:data:`APP_HOOKS`), registered by the application module with ``@urls.hook(name)`` (its
:class:`~geventtcp.urls.Registry`). Both kinds run, the config file's first, then the application's
in the order registered.

==================  ========  =================================================================
hook (arguments)    runs in   when; what an exception in it does (logged with its traceback)
==================  ========  =================================================================
on_starting(s)      master    before the listeners are bound; the master exits (status 2)
when_ready(s)       master    listeners bound, before the first worker; the master stops (2)
on_reload(s)        master    on HUP, config re-read, before the new workers; reload goes on
pre_fork(s, w)      master    before each fork (``w.pid`` is None); the fork goes on
post_fork(s, w)     worker    right after fork and gevent's patching, before the app is
                              imported; a boot error (counted like an import error)
post_worker_init(w) worker    app imported, before it serves; a boot error
worker_int(w)       worker    INT or QUIT (fast stop), before connections close; ignored
worker_abort(w)     worker    SIGABRT (heartbeat timeout), before the stack dump; ignored
worker_exit(s, w)   worker    every exit after post_fork: drain done (TERM, HUP, max_requests,
                              TTOU), fast stop, boot error; then ``atexit`` handlers; ignored
on_exit(s)          master    just before the master exits, workers gone; ignored
==================  ========  =================================================================

``s`` is a :class:`MasterInfo`, ``w`` a :class:`WorkerInfo`: small read-only snapshots, not the
launcher's objects. Hooks run seldom and off the request path: a launcher without hooks does not
call this module at all, and a hook costs nothing per request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from geventtcp.config import Hook, Settings

__all__ = ["MasterInfo", "WorkerInfo", "APP_HOOKS", "run_hooks", "HookFailedError"]

log = logging.getLogger("geventtcp.hooks")

#: The hooks an application module may register with ``@urls.hook(name)``: those that run in a worker
#: after it imported the application (``post_fork`` runs before, so only the config file can set it).
APP_HOOKS = ("post_worker_init", "worker_int", "worker_abort", "worker_exit")


class HookFailedError(Exception):
    """A hook raised where that aborts what called it (see the table above); the hook's traceback is logged."""


@dataclass(frozen=True)
class MasterInfo:
    """What a hook sees of the master (gunicorn's ``server``/arbiter argument), as of the call.

    ``log`` is the master's logger, so a gunicorn hook's ``server.log.info(...)`` works unchanged.
    """

    pid: int  #: the master's process id
    app: str  #: the application spec being served (``module`` or ``module:attr``)
    settings: Settings  #: the resolved settings (after a HUP: the re-read ones)
    num_workers: int  #: workers the master keeps running (TTIN/TTOU change it)
    generation: int  #: 0 at start, +1 per HUP reload
    log: logging.Logger


@dataclass(frozen=True)
class WorkerInfo:
    """What a hook sees of one worker process (gunicorn's ``worker`` argument).

    ``exit_reason`` is set for ``worker_int``, ``worker_abort`` and ``worker_exit``: ``shutdown`` (TERM,
    TTOU, master gone), ``reload`` (HUP), ``max_requests``, ``quit`` (INT/QUIT), ``abort`` (heartbeat
    timeout), ``boot_error`` or ``error`` (an unexpected exception in the worker).
    """

    pid: int | None  #: the worker's process id (None in ``pre_fork``: not forked yet)
    age: int  #: order of spawning: 1 for the first worker the master forked, then 2, ...
    slot: int  #: which worker slot it fills (0 .. workers-1; its listener with reuse_port)
    generation: int  #: the master's generation it was started in
    settings: Settings
    log: logging.Logger
    exit_reason: str = ""


def run_hooks(name: str, hooks: Iterable[Hook], *args: Any, abort: bool = False) -> None:
    """Call each of ``hooks`` (hook ``name``) with ``args``; log an exception with its traceback and go on
    to the next, or with ``abort`` stop there and raise :class:`HookFailedError`."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception as exc:  # noqa: BLE001 - a hook's failure is logged here, never lost
            log.exception("hook %s (%s) failed", name, getattr(hook, "__qualname__", hook))
            if abort:
                raise HookFailedError(f"hook {name} failed: {type(exc).__name__}: {exc}") from exc
