"""The master's signal queue: handlers only record the signal; the main loop reads and acts on it.

``signal.set_wakeup_fd`` makes the C-level handler write each signal's number into a pipe, so no
Python code runs inside a signal handler and a signal that arrives while the loop is busy is never
lost: the loop ``select``\\ s on the pipe and reads the numbers in order.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["SignalQueue", "Pollable"]

#: Signals whose every occurrence counts; any other repeated within one batch counts once.
COUNTED = (signal.SIGTTIN, signal.SIGTTOU)


def _record(signum: int, frame: Any) -> None:
    """Nothing to do here: the wakeup fd already queued ``signum``."""


class Pollable(Protocol):
    """Something else the master's loop serves between signals (the metrics endpoint), never blocking."""

    def watch(self) -> tuple[list[int], list[int], float | None]:
        """Descriptors to wait on for reading and for writing, and seconds until it must run anyway."""

    def ready(self, readable: list[int], writable: list[int]) -> None:
        """Act on the ready descriptors (maybe none: a deadline passed); must not block."""


class SignalQueue:
    """Installs recording handlers for ``signals`` (main thread only); :meth:`close` restores the defaults."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signals)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.fds = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd)
        for sig in self.signals:
            signal.signal(sig, _record)

    def wait(self, timeout: float, extra: Pollable | None = None) -> list[int]:
        """Block until a signal arrives or ``timeout`` passes; the signals received, in order.

        ``extra`` (the metrics endpoint) is served meanwhile: its descriptors are watched too, the
        wait ends by its next deadline, and its ``ready()`` runs before the signals are returned.
        """
        read_fd = self.fds[0]
        readers: list[int] = [read_fd]
        writers: list[int] = []
        if extra is not None:
            more, writers, due = extra.watch()
            readers.extend(more)
            if due is not None:
                timeout = min(timeout, due)
        try:
            ready, writable, _ = select.select(readers, writers, [], timeout)
        except InterruptedError:
            ready, writable = [read_fd], []
        if extra is not None:
            extra.ready(ready, writable)
        received: list[int] = []
        while True:
            try:
                data = os.read(read_fd, 64)
            except BlockingIOError:
                break
            if not data:
                break
            received.extend(data)
        batch: list[int] = []
        for sig in received:
            if sig not in batch or sig in COUNTED:
                batch.append(sig)
        return batch

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)
        for fd in self.fds:
            os.close(fd)
