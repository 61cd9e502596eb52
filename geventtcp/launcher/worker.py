"""A launcher worker process: set up after fork, import the app, serve the inherited listeners, heartbeat.

The master forks and calls :func:`run_worker` in the child, which never returns into the master's
code (the caller ``os._exit``\\ s with its result). Status reaches the master through the worker's
heartbeat file:

* its mtime is touched every ``timeout / 4`` seconds (at most 1 s) from a greenlet, so a blocked
  event loop stops the heartbeat;
* its size is the state: 0 booting, 1 serving, 2 draining (the master then starts a replacement);
  a state change also sends the master SIGCHLD, which only wakes its loop.

Signals (from the master): TERM drains with goaway ``shutdown``, HUP drains with goaway ``reload``,
USR2 (TTOU with shared listeners) drains with goaway ``shutdown`` leaving the backlog to the others,
INT/QUIT stop at once, USR1 reopens log files. SIGABRT (the master's heartbeat kill) dumps every
thread's stack through :mod:`faulthandler` before the process dies.

``log_config`` is applied here, right after the application is imported (its filters and formatters
may be the application's); a failure is a boot error whose message carries the cause.

Exit: the worker ends in ``os._exit`` (its caller's), never by unwinding into the master's code
(whose ``finally`` blocks would remove the master's listeners, pidfile and temporary files) and
never running the master's ``atexit`` handlers, which fork copied: :func:`run_worker` drops those
first. What the worker itself registers does run: on every exit after boot began (a drain that
ended, a fast stop, a boot error), :meth:`_Worker.exit` runs the ``worker_exit`` hooks, then the
``atexit`` handlers, while the hub still runs (so they may do cooperative I/O). Lifecycle hooks:
:mod:`geventtcp.hooks`.
"""

from __future__ import annotations

import atexit
import dataclasses
import faulthandler
import logging
import os
import random
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent import socket as gsocket

from geventtcp.config import HOOKS, Config, Hook
from geventtcp.hooks import HookFailedError, MasterInfo, WorkerInfo, run_hooks
from geventtcp.launcher.metrics import merge, read_snapshots, snapshot, write_snapshot
from geventtcp.log import apply_log_config, make_access_hook, reopen_log_files
from geventtcp.protocol import Builtin, encode_goaway
from geventtcp.server.blocking import enable_blocking_detector, warn_uncooperative_drivers
from geventtcp.server.server import Server
from geventtcp.sockets import send_and_linger
from geventtcp.urls import Registry, load_registry

__all__ = ["WorkerSpec", "run_worker", "WORKER_BOOT_ERROR", "STATE_BOOTING", "STATE_SERVING", "STATE_DRAINING"]

log = logging.getLogger("geventtcp.worker")

#: Exit status of a worker that could not import the application (gunicorn's value).
WORKER_BOOT_ERROR = 3
STATE_BOOTING, STATE_SERVING, STATE_DRAINING = 0, 1, 2
#: Signals the master handles; the worker resets them before installing its own.
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGTTIN, signal.SIGTTOU,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCHLD)


@dataclass
class WorkerSpec:
    """What a worker needs from the master; everything here is inherited across ``fork``."""

    app: str
    config: Config
    listeners: list[socket.socket]
    heartbeat_fd: int
    stats_dir: str
    master_pid: int
    generation: int = 0
    close_fds: list[int] = field(default_factory=list)
    master: MasterInfo | None = None  # the hooks' view of the master and of this worker, as of the fork
    info: WorkerInfo | None = None


def run_worker(spec: WorkerSpec) -> int:
    """Serve until told to stop; returns the exit status (:data:`WORKER_BOOT_ERROR` if the app fails to load)."""
    for sig in MASTER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    # The master blocked these around fork; a stop sent while we booted now takes its default effect.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
    for fd in spec.close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    atexit._clear()  # the master's handlers, copied by fork: not this process's to run (see _Worker.exit)
    # gunicorn's order: patch, then reinit the hub the fork copied from the master.
    from gevent import monkey

    monkey.patch_all()
    gevent.reinit()
    random.seed()  # the fork copied the master's generator state; workers must not share it
    faulthandler.enable()
    sockets = [gsocket.socket(s.family, s.type, fileno=s.detach()) for s in spec.listeners]
    worker = _Worker(spec, sockets)
    try:
        return worker.run()
    except BaseException:
        worker.exit_reason = worker.exit_reason or "error"  # the caller logs it
        raise
    finally:
        worker.exit()


class _Worker:
    def __init__(self, spec: WorkerSpec, sockets: list[Any]) -> None:
        self.spec = spec
        self.config = spec.config
        self.settings = spec.config.freeze()
        self.sockets = sockets
        self.server: Any = None
        self.state = STATE_BOOTING
        self.requests = 0
        self.pending_stop: tuple[str, bool] | None = None
        self.backlog_refused = False
        self.registry: Registry | None = None
        self.exit_reason = ""

    def run(self) -> int:
        cfg = self.settings
        # TERM: the listeners close with this worker (a stop, a slot retired by TTOU); HUP: a replacement
        # serves them on.
        gevent.signal_handler(signal.SIGTERM, self.drain, "shutdown", True)
        gevent.signal_handler(signal.SIGHUP, self.drain, "reload", False)
        gevent.signal_handler(signal.SIGUSR2, self.drain, "shutdown", False)  # TTOU: the shared listener stays
        gevent.signal_handler(signal.SIGINT, self.quit)
        gevent.signal_handler(signal.SIGQUIT, self.quit)
        gevent.signal_handler(signal.SIGUSR1, self._reopen_logs)
        heartbeat = gevent.spawn(self._heartbeat)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            self._run_hooks("post_fork", abort=True)
            registry = self.registry = load_registry(self.spec.app)
            if cfg.log_config:  # here, not in the master: its filters and formatters may be the app's
                apply_log_config(cfg.log_config)
            server = Server(registry, config=self.config, listeners=self.sockets)
            if cfg.workers != 1:
                server.max_accept = 1  # share bursts of new connections between workers
            server.access_log = self._request_hook(make_access_hook() if cfg.access_log else None)
            self._run_hooks("post_worker_init", abort=True)
            server.start()
        except HookFailedError as exc:  # its traceback is logged
            log.error("worker failed to boot: %s", exc)
            self.exit_reason = "boot_error"
            return WORKER_BOOT_ERROR
        except BaseException:
            # Imported after fork on purpose (HUP re-imports). Failing here is a boot error, which
            # the master counts (and halts on) instead of respawning in a tight loop.
            log.exception("worker failed to boot (application %r)", self.spec.app)
            self.exit_reason = "boot_error"
            return WORKER_BOOT_ERROR
        self.server = server
        if self._hooks("worker_abort"):  # else faulthandler's own SIGABRT handler, as without hooks
            signal.signal(signal.SIGABRT, self._abort)
        server.set_builtin(Builtin.STATS, self._stats_all)  # any worker answers for all of them
        enable_blocking_detector(cfg.blocking_time)
        warn_uncooperative_drivers()
        # The snapshot first: once the master sees SERVING (and writes bind_file when all serve),
        # STATS on any worker already lists this one.
        self._write_stats()
        self._set_state(STATE_SERVING)
        if self.pending_stop is not None:
            self.drain(*self.pending_stop)
        server.serve_forever()
        heartbeat.kill(block=False)
        self._write_stats(final=True)
        return 0

    # -- lifecycle hooks (geventtcp.hooks) ---------------------------------------------------------

    def _hooks(self, name: str) -> list[Hook]:
        """Hook ``name`` of the config file, then the application's (once it is imported)."""
        own = self.config.hooks.get(name)
        return ([own] if own is not None else []) + (self.registry.hooks(name) if self.registry is not None else [])

    def _info(self) -> WorkerInfo:
        assert self.spec.info is not None, "set by the master"
        return dataclasses.replace(self.spec.info, pid=os.getpid(), exit_reason=self.exit_reason)

    def _run_hooks(self, name: str, abort: bool = False) -> None:
        hooks = self._hooks(name)
        if hooks:
            with_master = len(HOOKS[name]) == 2  # (server, worker) or (worker)
            args = (self.spec.master, self._info()) if with_master else (self._info(),)
            run_hooks(name, hooks, *args, abort=abort)

    def exit(self) -> None:
        """The end of every exit after boot began: ``worker_exit`` hooks, then this process's ``atexit``
        handlers (``os._exit`` follows, which would skip them)."""
        self.exit_reason = self.exit_reason or "shutdown"
        self._run_hooks("worker_exit")
        atexit._run_exitfuncs()

    def _abort(self, signum: int, frame: Any) -> None:
        """SIGABRT (the heartbeat kill) with ``worker_abort`` hooks: run them, dump the stacks, die of SIGABRT.

        A Python signal handler runs only between bytecodes: a worker stuck inside C code gets
        no hook, and the master's SIGKILL ends it (``ABORT_GRACE`` later) as without one.
        """
        self.exit_reason = "abort"
        self._run_hooks("worker_abort")
        faulthandler.dump_traceback(all_threads=True)
        signal.signal(signal.SIGABRT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGABRT)

    def _request_hook(self, access: Any) -> Any:
        """The per-request hook: access log and/or the max_requests countdown; None (free) when both are off."""
        cfg = self.settings
        limit = cfg.max_requests + random.randint(0, cfg.max_requests_jitter) if cfg.max_requests else 0
        if not limit:
            return access

        def hook(conn: Any, req: Any, code: int, seconds: float) -> None:
            self.requests += 1
            if access is not None:
                access(conn, req, code, seconds)
            if self.requests == limit:
                log.info("autorestarting worker after %d requests (max_requests)", limit)
                self.drain("max_requests", False)  # the replacement serves the same listeners

        return hook

    def _stats_all(self, request: Any) -> Any:
        """STATS: this worker's fresh snapshot merged with the other workers' latest ones."""
        self._write_stats()
        merged = merge(read_snapshots(self.spec.stats_dir))
        merged["pid"] = os.getpid()
        return merged

    def drain(self, reason: str, listeners_close: bool) -> None:
        """Stop accepting, answer what was read, goaway idle connections, exit (graceful_timeout at most).

        ``listeners_close``: nobody accepts from this worker's listeners after it (a stop, or its
        SO_REUSEPORT slot retired), so what waits in their backlog gets a goaway. Otherwise (a restart:
        max_requests, HUP) the backlog is left to the worker that serves them next.
        """
        if self.server is None:  # the hub ran while the app was importing: drain once it serves
            closing = listeners_close or (self.pending_stop is not None and self.pending_stop[1])
            self.pending_stop = (reason, closing)
            return
        self.exit_reason = self.exit_reason or reason
        if self.state == STATE_DRAINING:
            if listeners_close and not self.backlog_refused:
                self._refuse_backlog(reason)  # a stop during a restart's drain: see _refuse_backlog
            return
        self._set_state(STATE_DRAINING)
        log.info("worker draining (%s)", reason)
        # Flag it now, not when the stop greenlet first runs: a reader that finishes a batch in
        # the meantime then sends its goaway instead of reading the next request.
        self.server.begin_drain(reason)
        if listeners_close:
            self._refuse_backlog(reason)
        else:
            self.server.stop_accepting()  # now: an accept before the stop greenlet runs would get a goaway
        gevent.spawn(self.server.stop, self.settings.graceful_timeout, reason)

    def _refuse_backlog(self, reason: str) -> None:
        """Accept what waits in the listen backlog, answer it with a goaway, and close the listeners.

        On a stop nobody may accept those connections again (a slot retired by TTOU, the last
        worker stopping); closing the listener would reset them, and a peer that already wrote a
        request could not tell whether it ran. The goaway says it did not: reconnect and resend.
        The close follows the last accept without yielding to the hub: an SO_REUSEPORT socket gets
        new connections until it is closed, and each one queued at the close would be reset.

        Also run when the stop comes during a drain that left the backlog to others (USR2, HUP,
        max_requests) if this worker's hub was busy meanwhile: its copies may still be open, and
        once the other workers have stopped they are the last ones (already closed ones accept nothing).
        """
        self.backlog_refused = True
        self.server.stop_accepting()
        line = encode_goaway(self.server.codec, reason)
        for listener in self.sockets:
            listener.settimeout(0.0)  # accept what is queued now, never wait
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # BlockingIOError: the backlog is empty
                    break
                gevent.spawn(send_and_linger, conn, line)
            listener.close()  # this process's copy; a shared socket stays open in the other workers

    @staticmethod
    def _reopen_logs() -> None:
        reopen_log_files()
        log.info("log files reopened")

    def quit(self) -> None:
        if self.server is None:
            os._exit(0)  # SystemExit here would surface in the import and look like a boot error
        self.exit_reason = "quit"
        self._run_hooks("worker_int")
        self._set_state(STATE_DRAINING)
        self.server.close()

    def _set_state(self, state: int) -> None:
        """Publish ``state`` in the heartbeat file and wake the master to read it (CHLD only wakes it)."""
        self.state = state
        try:
            os.ftruncate(self.spec.heartbeat_fd, state)
            if os.getppid() == self.spec.master_pid:
                os.kill(self.spec.master_pid, signal.SIGCHLD)
        except OSError:
            pass

    def _heartbeat(self) -> None:
        """Touch the heartbeat file and publish stats; runs as a greenlet, so it stops when the hub is stuck."""
        timeout = self.settings.timeout
        period = max(0.05, min(1.0, timeout / 4)) if timeout else 1.0
        fd = self.spec.heartbeat_fd
        while True:
            try:
                os.utime(fd)
            except OSError:
                pass
            if os.getppid() != self.spec.master_pid:
                log.warning("master (pid %d) is gone: shutting down", self.spec.master_pid)
                self.drain("shutdown", True)
            self._write_stats()
            gevent.sleep(period)

    def _write_stats(self, final: bool = False) -> None:
        server = self.server
        if server is None:
            return
        path = os.path.join(self.spec.stats_dir, f"{os.getpid()}.json")
        if final:
            try:
                os.unlink(path)
            except OSError:
                pass
            return
        try:
            write_snapshot(self.spec.stats_dir, snapshot(server, generation=self.spec.generation))
        except OSError as exc:
            log.debug("cannot write stats snapshot: %s", exc)
