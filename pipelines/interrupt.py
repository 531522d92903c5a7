"""Stopping a run early: a request from the caller (`should_stop`, as the GUI stops), or SIGINT / SIGTERM.

The first signal asks the run to stop after the step in progress; it then saves a checkpoint, exports what it has
learned under a partial name, and `train` raises `TrainingInterrupted`, so a script never mistakes the run for a
finished one (the command exits 130 for SIGINT, 143 for SIGTERM, the shell's 128 + signal number). A second signal
stops at once: the step in progress is dropped, every file write in progress is undone (writes go through temporary
files), and the last checkpoint stays as it was.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):  # noqa: N818 - a KeyboardInterrupt, named for what happened
    """Training was stopped by SIGINT or SIGTERM before its planned steps.

    A KeyboardInterrupt, so that `except Exception` does not swallow it. `exit_status` is the shell's convention
    for the signal (130 for SIGINT, 143 for SIGTERM); the message says what was saved and how to continue.
    """

    def __init__(self, signum: int, message: str, saved: bool) -> None:
        super().__init__(message)
        self.signum = signum
        self.saved = saved
        """Whether the run saved a checkpoint and exported at the step it stopped (False after a second signal)."""

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by that signal."""
        return 128 + self.signum


class StopRequests:
    """Whether the run should stop now: `should_stop()` said so, or a signal arrived (`signum`, the first one)."""

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop
        self.signum: int | None = None
        self._requested = threading.Event()

    def __call__(self) -> bool:
        return self._requested.is_set() or (self.should_stop is not None and bool(self.should_stop()))

    @property
    def by(self) -> str:
        """" by SIGTERM" (the first signal's name) when a signal asked the run to stop, else ""."""
        return f" by {signal.Signals(self.signum).name}" if self.signum is not None else ""

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._requested.is_set():
            raise TrainingInterrupted(signum, f"stopped at once by a second {name}", saved=False)
        self.signum = signum
        self._requested.set()
        log.warning("%s: stopping after this step and saving a checkpoint (%s again stops at once, without one)",
                    name, name)


@contextmanager
def stop_requests(should_stop: Callable[[], bool] | None) -> Iterator[StopRequests]:
    """Yield the run's `StopRequests`; in the main thread, SIGINT and SIGTERM are routed to it meanwhile.

    Signal handlers are installed only in the main thread (Python allows no other) and restored on exit.
    """
    requests = StopRequests(should_stop)
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, requests._handle)
    try:
        yield requests
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
