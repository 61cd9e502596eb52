"""The master's signal queue: handlers only record the signal; the main loop reads and acts on it.

``signal.set_wakeup_fd`` makes the C-level handler write each signal's number into a pipe, so no
Python code runs inside a signal handler and a signal that arrives while the loop is busy is never
lost: the loop ``select``\\ s on the pipe and reads the numbers in order.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["SignalQueue"]

#: Signals whose every occurrence counts; any other repeated within one batch counts once.
COUNTED = (signal.SIGTTIN, signal.SIGTTOU)


def _record(signum: int, frame: Any) -> None:
    """Nothing to do here: the wakeup fd already queued ``signum``."""


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

    def wait(self, timeout: float, extra: Any = None, on_extra: Callable[[], None] | None = None) -> list[int]:
        """Block until a signal arrives or ``timeout`` passes; the signals received, in order.

        ``extra`` is another readable object to watch (the metrics listener); when it is readable,
        ``on_extra()`` runs before the signals are returned.
        """
        read_fd = self.fds[0]
        watched: list[Any] = [read_fd] + ([extra] if extra is not None else [])
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            ready = [read_fd]
        if extra is not None and extra in ready and on_extra is not None:
            on_extra()
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
