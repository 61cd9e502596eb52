"""The master's bookkeeping of its worker processes: reaping exits, reading heartbeats, killing."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from geventtcp.config import Config, Settings
from geventtcp.errors import GeventTCPError
from geventtcp.launcher.worker import STATE_DRAINING, STATE_SERVING, WORKER_BOOT_ERROR

__all__ = ["WorkerSupervisor", "WorkerProcess", "HaltServerError", "BOOT_FAILURE_LIMIT", "ABORT_GRACE", "STOP_MARGIN"]

log = logging.getLogger("geventtcp.arbiter")  # the master's logger: these are its decisions

#: Consecutive worker boot failures (no worker booted in between) that stop the server.
BOOT_FAILURE_LIMIT = 3
#: Seconds between SIGABRT and SIGKILL for a worker whose heartbeat stopped.
ABORT_GRACE = 1.0
#: Seconds past graceful_timeout before the master SIGKILLs a draining worker.
STOP_MARGIN = 1.0


class HaltServerError(GeventTCPError):
    """Stops the master: ``reason`` is logged, ``exit_status`` becomes the process's exit status."""

    def __init__(self, reason: str, exit_status: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


@dataclass
class WorkerProcess:
    """The master's record of one forked worker."""

    pid: int
    slot: int  # which of the listener slots it serves (see geventtcp.listeners)
    generation: int
    heartbeat_fd: int
    heartbeat_path: str
    spawned_at: float
    retiring: bool = False  # draining or told to; not counted toward the wanted number
    signalled: bool = False  # the retiring signal has been sent
    aborted_at: float = 0.0
    booted: bool = False
    killed: bool = False  # the master sent the SIGKILL (so the log need not guess at the OOM killer)
    stop_deadline: float = field(default=0.0)


class WorkerSupervisor:
    """The part of :class:`geventtcp.launcher.arbiter.Arbiter` that tracks forked workers (no signals, no forking).

    The master's loop calls :meth:`_reap` (collect exits, log why, count boot failures) and
    :meth:`_murder` (heartbeat files: booted, draining on its own, overdue, silent) on every
    iteration. Raises :class:`HaltServerError` when workers keep failing to boot.
    """

    config: Config
    settings: Settings
    num_workers: int
    workers: dict[int, WorkerProcess]
    stats_dir: str
    boot_failures: int
    stopping: bool
    #: Pids of the workers that served when the pending reload (or chain of reloads) began, and the
    #: configuration they serve with: config, settings, number of workers.
    fallback: set[int]
    fallback_config: tuple[Config, Settings, int]

    def _retire(self, worker: WorkerProcess, sig: int) -> None:
        worker.retiring = worker.signalled = True
        worker.stop_deadline = time.monotonic() + self.settings.graceful_timeout + STOP_MARGIN
        self._kill(worker.pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._forget(worker)
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                if sig == signal.SIGKILL and worker.killed:
                    log.warning("Worker (pid:%d) killed by the master (SIGKILL)", pid)
                elif sig == signal.SIGKILL:
                    log.error("Worker (pid:%d) was sent SIGKILL! Perhaps out of memory?", pid)
                else:
                    log.error("Worker (pid:%d) was killed by %s", pid, signal.Signals(sig).name)
            else:
                code = os.WEXITSTATUS(status)
                if code == WORKER_BOOT_ERROR and worker.retiring:
                    # Replaced before it served: stopped by an abort (a TERM waits while it imports,
                    # so it fails like the first one did) or overtaken by a later HUP. Not a new
                    # failure of what the master runs now: it neither counts nor aborts anything.
                    log.warning("Worker (pid:%d) of a superseded generation failed to boot", pid)
                elif code == WORKER_BOOT_ERROR:
                    self.boot_failures += 1
                    log.error("Worker (pid:%d) failed to boot (%d in a row)", pid, self.boot_failures)
                    if self._abort_reload():
                        continue
                    if self.boot_failures >= BOOT_FAILURE_LIMIT and not self.stopping:
                        raise HaltServerError("worker failed to boot: the application cannot be loaded (see above)",
                                         WORKER_BOOT_ERROR)
                elif code or not (worker.retiring or self.stopping):
                    log.warning("Worker (pid:%d) exited with code %d", pid, code)
                else:
                    log.info("Worker (pid:%d) exited", pid)

    def _abort_reload(self) -> bool:
        """A new generation that cannot boot must not take the serving one down: keep the old workers.

        True when a reload was pending (old workers not yet told to drain): the workers that served
        before the first pending HUP (:attr:`fallback`) are current again, and every other worker
        is stopped: the failed generation's, and those of an earlier reload it overtook before they
        booted (restoring them too would leave two code versions, twice the workers, running). Their
        configuration is current again too (and with it the number of workers, undoing a TTIN/TTOU
        sent during the reload): a reload's, had it more workers, would fork the broken release for
        the extra slots at once, and halt the master once three had failed.
        """
        waiting = [w for w in self.workers.values() if w.retiring and not w.signalled]
        if not waiting or self.stopping:
            return False
        log.error("reload failed: the new application cannot boot; the previous workers keep serving")
        for worker in list(self.workers.values()):
            if worker.pid in self.fallback and not worker.signalled:
                worker.retiring = False
            elif not worker.signalled:
                self._retire(worker, signal.SIGTERM)
        self.config, self.settings, self.num_workers = self.fallback_config
        self.boot_failures = 0
        return True

    def _forget(self, worker: WorkerProcess) -> None:
        os.close(worker.heartbeat_fd)
        for path in (worker.heartbeat_path, os.path.join(self.stats_dir, f"{worker.pid}.json")):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _murder(self) -> None:
        """Read every worker's heartbeat file: state changes, missed heartbeats, overdue drains."""
        timeout = self.settings.timeout
        now_wall = time.time()
        now = time.monotonic()
        for worker in list(self.workers.values()):
            try:
                st = os.fstat(worker.heartbeat_fd)
            except OSError:
                continue
            if st.st_size >= STATE_SERVING and not worker.booted:
                worker.booted = True
                self.boot_failures = 0
            if st.st_size >= STATE_DRAINING and not worker.retiring:
                worker.retiring = worker.signalled = True  # it drains on its own (max_requests): replace it
                worker.stop_deadline = now + self.settings.graceful_timeout + STOP_MARGIN
            if worker.aborted_at:
                if now - worker.aborted_at > ABORT_GRACE:
                    self._kill(worker.pid, signal.SIGKILL)
                continue
            if worker.stop_deadline and now > worker.stop_deadline:
                log.warning("Worker (pid:%d) still draining after graceful_timeout: SIGKILL", worker.pid)
                self._kill(worker.pid, signal.SIGKILL)
                worker.stop_deadline = 0.0
                continue
            silent = now_wall - st.st_mtime if worker.booted else now - worker.spawned_at
            if timeout and silent > timeout:
                log.critical("WORKER TIMEOUT (pid:%d): no heartbeat for %.1fs", worker.pid, silent)
                worker.aborted_at = now
                self._kill(worker.pid, signal.SIGABRT)

    def _kill(self, pid: int, sig: int) -> None:
        if sig == signal.SIGKILL and pid in self.workers:
            self.workers[pid].killed = True
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.workers):
            self._kill(pid, sig)
