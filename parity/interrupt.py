"""SIGTERM (a killed CI job, `timeout`) stops a run like Ctrl-C, so the report of what was done is written.

A signal turns into KeyboardInterrupt only where that is safe: inside a preview's check (renders can take
minutes, so they stop at once) or where no loop over previews is running. Between previews, inside pytest's or
the report writer's own code, it is only noted, and the loop stops before its next preview: an exception raised
in the middle of pytest's reporting can leave pytest unable to print it (exit 1 instead of "interrupted").
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupt:
    def __init__(self) -> None:
        self.polled = False  # a loop over previews asks `pending` between previews
        self.checking = False  # a preview's check is running
        self.pending = False  # a signal came between previews

    def handle(self, signum, frame) -> None:
        if self.polled and not self.checking:
            self.pending = True
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def start(self) -> None:
        """A loop over previews begins; it asks `pending` (or calls `check`) between previews."""
        self.polled, self.pending = True, False

    def stop(self) -> None:
        self.polled = False

    @contextmanager
    def loop(self):
        """`start` ... `stop` around a loop over previews."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    @contextmanager
    def check(self):
        """One preview's check: a signal that came before it stops here, one that comes during it stops it."""
        self.checking = True
        try:
            if self.pending:
                raise KeyboardInterrupt("signal before this preview")
            yield
        finally:
            self.checking = False


INTERRUPT = Interrupt()


def stop_on_sigterm() -> None:
    """Handle SIGTERM as above. Only from the main thread, and only where nobody else handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, INTERRUPT.handle)
