"""The master process: bind once, fork and supervise workers, turn signals into actions (gunicorn's Arbiter).

The master never imports the application and never runs gevent's hub: it binds every listener,
forks the workers (each imports the app after fork, so a HUP reload re-imports it), and then sits in
a ``select`` loop. Signal handlers do nothing but wake that loop (``signal.set_wakeup_fd`` writes
the signal number into a pipe); the loop dispatches ``handle_<name>()`` by signal name.

==========  =================================================================================
TERM        graceful stop: workers drain (goaway ``shutdown``), SIGKILL after graceful_timeout
INT, QUIT   fast stop: workers close at once
HUP         reload: re-read the config, start new workers, then drain the old ones (goaway
            ``reload``); the listeners stay open throughout, so no connection is refused
TTIN, TTOU  one worker more / less
USR1        reopen log files (master and workers)
CHLD        reap: a worker that died (even ``kill -9``) is replaced
==========  =================================================================================

Lifecycle hooks (:mod:`geventtcp.hooks`) from the config file run here: ``on_starting``,
``when_ready``, ``on_reload``, ``pre_fork`` and ``on_exit`` in the master (the worker's hooks run
in :mod:`geventtcp.launcher.worker`).

A worker whose heartbeat stops for ``timeout`` seconds is sent SIGABRT, then SIGKILL, and replaced.
Workers that fail to import the application :data:`BOOT_FAILURE_LIMIT` times in a row halt the
master with exit status 3, except during a reload, which is abandoned: the workers that served
before it keep serving, and any other (also those of an earlier reload it overtook) is stopped.
That bookkeeping (reaping, heartbeats, kills) lives in :mod:`geventtcp.supervisor`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from geventtcp.config import Config, Settings
from geventtcp.errors import GeventTCPError
from geventtcp.hooks import HookFailedError, MasterInfo, WorkerInfo, run_hooks
from geventtcp.launcher.listeners import ListenerSet
from geventtcp.launcher.signals import SignalQueue
from geventtcp.launcher.supervisor import (
    BOOT_FAILURE_LIMIT,
    STOP_MARGIN,
    HaltServerError,
    WorkerProcess,
    WorkerSupervisor,
)
from geventtcp.launcher.worker import MASTER_SIGNALS, WorkerSpec, run_worker
from geventtcp.log import reopen_log_files

if TYPE_CHECKING:
    from geventtcp.launcher.metrics_endpoint import MetricsEndpoint

__all__ = ["Arbiter", "HaltServerError", "BOOT_FAILURE_LIMIT"]

log = logging.getLogger("geventtcp.arbiter")
WORKER_LOG = logging.getLogger("geventtcp.worker")  # WorkerInfo.log: the worker's own logger

#: How long a HUP waits for the new workers to boot before draining the old ones anyway.
RELOAD_BOOT_WAIT = 30.0


class _StoppedError(Exception):
    """Ends the main loop after a stop signal was handled."""


class Arbiter(WorkerSupervisor):
    """Run the launcher for ``app`` with ``config``; :meth:`run` returns the exit status.

    ``reload_config`` (optional) re-reads the configuration from its sources on HUP; listeners are
    never re-bound, so a changed ``bind`` needs a restart.
    """

    SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGTTIN, signal.SIGTTOU,
               signal.SIGUSR1, signal.SIGCHLD)
    SIG_NAMES: dict[int, str] = {sig: sig.name[3:].lower() for sig in SIGNALS}

    def __init__(self, app: str, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.app = app
        self.config = config  # handed to each worker (its Server keeps the sources)
        self.settings: Settings = config.freeze()
        self.reload_config = reload_config
        self.pid = os.getpid()
        self.workers: dict[int, WorkerProcess] = {}
        self.num_workers = self.settings.workers or os.cpu_count() or 1
        self.generation = 0
        self.spawned = 0  # workers forked so far: the next one's WorkerInfo.age
        self.listeners: ListenerSet | None = None
        self.boot_failures = 0
        self.stopping = False
        self.fallback: set[int] = set()
        self.fallback_config = (config, self.settings, self.num_workers)
        self.tmpdir = ""
        self.stats_dir = ""
        self.signals: SignalQueue | None = None
        self._pidfile_written = False
        self._announced = False  # the bound addresses were written (bind_file), once the workers served
        self._bind_file_written = False
        self._reload_started = 0.0
        self._metrics: MetricsEndpoint | None = None

    # -- setup -----------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.settings
        self.listeners = ListenerSet(list(cfg.bind), cfg.backlog, cfg.reuse_port)
        self.tmpdir = tempfile.mkdtemp(prefix="geventtcp-")
        self.stats_dir = os.path.join(self.tmpdir, "stats")
        os.mkdir(self.stats_dir)
        if cfg.metrics_bind:
            from geventtcp.launcher.metrics_endpoint import MetricsEndpoint

            self._metrics = MetricsEndpoint(cfg.metrics_bind, self.stats_dir, bool(cfg.protected_mode))
        self._preflight()
        if cfg.pidfile:
            with open(cfg.pidfile, "w", encoding="ascii") as fh:
                fh.write(f"{self.pid}\n")
            self._pidfile_written = True
        self.signals = SignalQueue(self.SIGNALS)
        addresses = ", ".join(self._listeners().bound)
        log.info("master %d bound %s; starting %d worker(s)", self.pid, addresses, self.num_workers)

    def _preflight(self) -> None:
        """Fail here, once, with a clear message, on what would make every worker fail to start."""
        from geventtcp.server.security import check_serving_settings

        metrics = [self._metrics.address()] if self._metrics is not None else []
        bind_file = self.settings.bind_file
        if bind_file and bind_file != "-" and not os.access(os.path.dirname(bind_file) or ".", os.W_OK):
            raise OSError(f"bind_file {bind_file}: its directory is missing or not writable")
        check_serving_settings(self.settings, [sock.getsockname() for sock in self._listeners().all()], metrics)

    def _signal_fds(self) -> tuple[int, ...]:
        return self.signals.fds if self.signals is not None else ()

    def _listeners(self) -> ListenerSet:
        assert self.listeners is not None, "bound in _setup"
        return self.listeners

    def _teardown(self) -> None:
        if self.signals is not None:
            self.signals.close()
        if self.listeners is not None:
            self.listeners.close()
            self.listeners.unlink()
        if self._metrics is not None:
            self._metrics.close()
        if self._bind_file_written:
            try:
                os.unlink(self.settings.bind_file)
            except OSError:
                pass
        if self._pidfile_written:  # never another instance's file (a start that failed to bind)
            try:
                os.unlink(self.settings.pidfile)
            except OSError:
                pass
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- main loop -------------------------------------------------------------------------------

    def _master_info(self) -> MasterInfo:
        return MasterInfo(self.pid, self.app, self.settings, self.num_workers, self.generation, log)

    def _hook(self, name: str, *args: object, abort: bool = False) -> None:
        """Run the config file's hook ``name`` with the master's view first in its arguments (if set)."""
        hook = self.config.hooks.get(name)
        if hook is not None:
            run_hooks(name, [hook], self._master_info(), *args, abort=abort)

    def run(self) -> int:
        """Serve until stopped by a signal; returns 0, or the :class:`HaltServerError` status."""
        try:
            self._hook("on_starting", abort=True)
        except HookFailedError as exc:
            log.error("cannot start: %s", exc)
            return 2
        status = self._run()
        self._hook("on_exit")
        log.info("master %d exiting (status %d)", self.pid, status)
        return status

    def _run(self) -> int:
        status = 0
        try:
            self._setup()
            self._hook("when_ready", abort=True)
        except (GeventTCPError, OSError, HookFailedError) as exc:
            log.error("cannot start: %s", exc)
            self._teardown()
            return 2
        try:
            self._manage_workers()
            while True:
                # Poll faster while a worker boots, so a reload retires the old generation promptly.
                booting = any(not w.booted for w in self.workers.values())
                for sig in self._wait(0.1 if booting else 1.0):
                    name = self.SIG_NAMES.get(sig)
                    if name is None:
                        continue
                    if name != "chld":
                        log.info("handling signal: %s", name)
                    getattr(self, f"handle_{name}")()
                self._reap()
                self._murder()
                self._manage_workers()
                if not self._announced:
                    self._announce()
        except _StoppedError:
            pass
        except HaltServerError as halt:
            log.error("shutting down: %s", halt.reason)
            status = halt.exit_status
            self._stop(graceful=False)
        except BaseException:
            log.exception("unhandled exception in the master")
            self._stop(graceful=False)
            status = 1
        finally:
            self._teardown()
        return status

    def _announce(self) -> None:
        """Write the bound addresses (``bind_file``) once every worker of the first generation serves.

        Only then, so a tool that waits for the file (the pytest plugin's server fixture) knows the
        application imported and its first call is answered at once; a server whose workers fail to
        boot exits without ever writing it. Written to a temporary file renamed into place, so a
        reader never sees half of it; ``-`` prints the lines to stdout (flushed) instead.
        """
        workers = [w for w in self.workers.values() if not w.retiring]
        if len(workers) < self.num_workers or not all(w.booted for w in workers):
            return
        self._announced = True
        path = self.settings.bind_file
        if not path:
            return
        text = "".join(f"{address}\n" for address in self._listeners().bound)
        if path == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        tmp = f"{path}.{self.pid}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
        self._bind_file_written = True

    def _wait(self, timeout: float) -> list[int]:
        """Sleep until a signal arrives or ``timeout`` passes (serving metrics meanwhile); the signals."""
        assert self.signals is not None, "installed in _setup"
        return self.signals.wait(timeout, self._metrics)

    # -- signal handlers -------------------------------------------------------------------------

    def handle_chld(self) -> None:
        """Reaping happens on every loop iteration; the signal only woke the loop."""

    def handle_term(self) -> None:
        self._stop(graceful=True)
        raise _StoppedError

    def handle_int(self) -> None:
        self._stop(graceful=False)
        raise _StoppedError

    handle_quit = handle_int

    def handle_hup(self) -> None:
        """Reload: new workers with a fresh import of the app, then the old ones drain."""
        if not any(w.retiring and not w.signalled for w in self.workers.values()):
            # No reload pending: what serves now (workers and configuration) is what a failed reload
            # falls back to. A HUP that overtakes a pending reload keeps the workers that served before
            # that one.
            self.fallback = {w.pid for w in self.workers.values() if not w.retiring}
            self.fallback_config = (self.config, self.settings, self.num_workers)
        if self.reload_config is not None:
            try:
                config = self.reload_config()
            except GeventTCPError as exc:
                log.error("reload: configuration not reloaded: %s", exc)
            else:
                if config.values["bind"] != self.settings.bind:
                    log.warning("reload: bind changed; listeners are kept as they are until a restart")
                    config.values["bind"] = list(self.settings.bind)
                self.config = config
                self.settings = config.freeze()
                self.num_workers = self.settings.workers or os.cpu_count() or 1
        self.generation += 1
        self._hook("on_reload")  # sees the new generation and config; the new workers start after it
        self._reload_started = time.monotonic()
        for worker in self.workers.values():
            worker.retiring = True  # replaced by the new generation, drained once it has booted
        log.info("reload: starting %d worker(s) of generation %d", self.num_workers, self.generation)

    def handle_ttin(self) -> None:
        self.num_workers += 1
        log.info("workers: %d", self.num_workers)

    def handle_ttou(self) -> None:
        if self.num_workers <= 1:
            log.info("workers: already at 1, not decreasing")
            return
        self.num_workers -= 1
        log.info("workers: %d", self.num_workers)

    def handle_usr1(self) -> None:
        reopen_log_files()
        log.info("log files reopened")
        self._signal_all(signal.SIGUSR1)

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        fd, path = tempfile.mkstemp(prefix="worker-", dir=self.tmpdir)
        pid = -1
        mine = self._listeners().for_slot(slot)
        # The child closes what is not its own: a copy of another slot's socket held by a worker
        # that never accepts on it would strand the connections the kernel hashes there.
        others = [sock.fileno() for sock in self._listeners().all() if sock not in mine]
        self.spawned += 1
        info = WorkerInfo(None, self.spawned, slot, self.generation, self.settings, WORKER_LOG)
        spec = WorkerSpec(self.app, self.config, mine, fd, self.stats_dir, self.pid, self.generation,
                          close_fds=[*self._signal_fds(), *(self._metrics.fds() if self._metrics else []), *others],
                          master=self._master_info(),
                          info=info)
        self._hook("pre_fork", info)
        # Signals stay blocked across fork until the child has reset the master's handlers: a TERM
        # that reached the child in between would run the master's queueing handler there and be
        # lost, leaving a worker that boots and serves after the master asked everyone to stop.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:  # the child never returns into the master's code
            status = 1
            try:
                for other in self.workers.values():
                    os.close(other.heartbeat_fd)
                status = run_worker(spec)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(status)
        self.workers[pid] = WorkerProcess(pid, slot, self.generation, fd, path, time.monotonic())
        log.info("booting worker with pid %d (slot %d, generation %d)", pid, slot, self.generation)

    def _manage_workers(self) -> None:
        """Start missing workers, retire extra ones, drain the previous generation once the new one serves."""
        if self.stopping:
            return
        current = [w for w in self.workers.values() if not w.retiring]
        used = {w.slot for w in current}
        for slot in range(self.num_workers):
            if slot not in used:
                self._spawn(slot)
        for worker in current:
            if worker.slot >= self.num_workers:  # TTOU (or a reload with fewer workers)
                # TERM: its own SO_REUSEPORT listener closes with it, so it answers its backlog with a
                # goaway; USR2: shared listeners stay open, the other workers accept what is queued.
                self._retire(worker, signal.SIGTERM if self._listeners().slots else signal.SIGUSR2)
        self._listeners().close_slots_from(self.num_workers)
        pending = [w for w in self.workers.values() if w.retiring and not w.signalled]
        if pending:
            fresh = [w for w in self.workers.values() if not w.retiring]
            waited = time.monotonic() - self._reload_started
            if all(w.booted for w in fresh) or waited > RELOAD_BOOT_WAIT:
                for worker in pending:
                    self._retire(worker, self._reload_signal(worker))

    def _reload_signal(self, worker: WorkerProcess) -> int:
        """HUP: a new worker serves the old one's listeners on. TERM when its own SO_REUSEPORT slot is gone
        (a reload to fewer workers, a TTOU during a reload): that socket closes with it, so it answers
        what waits there with a goaway instead of leaving it to be reset."""
        return signal.SIGTERM if self._listeners().slots and worker.slot >= self.num_workers else signal.SIGHUP

    # -- stopping --------------------------------------------------------------------------------

    def _stop(self, graceful: bool) -> None:
        """Stop every worker: TERM and wait up to graceful_timeout (graceful), or QUIT and wait briefly."""
        self.stopping = True
        if self.listeners is not None:  # workers hold their own copies until they stop accepting
            self.listeners.close()
        # A worker stops what still runs at graceful_timeout itself; give it a moment past that.
        limit = self.settings.graceful_timeout + STOP_MARGIN if graceful else 2.0
        self._signal_all(signal.SIGTERM if graceful else signal.SIGQUIT)
        deadline = time.monotonic() + limit
        while self.workers and time.monotonic() < deadline:
            for sig in self._wait(0.1):
                if graceful and sig in (signal.SIGINT, signal.SIGQUIT):
                    log.info("fast stop requested while draining")
                    graceful = False
                    self._signal_all(signal.SIGQUIT)
                    deadline = min(deadline, time.monotonic() + 2.0)
            self._reap()
        if self.workers:
            log.warning("killing %d worker(s) still running after %.1fs", len(self.workers), limit)
            self._signal_all(signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while self.workers and time.monotonic() < deadline:
                self._wait(0.05)
                self._reap()
