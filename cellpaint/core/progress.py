"""Progress of long work where no one watches a bar: a log line at a steady rate.

On a terminal tqdm draws its bar and this stays quiet; where stderr is a file or a pipe (a
scheduler's log, `nohup`, a container) tqdm is off (`disable=None`), so without these lines a
prediction of the real test set would print nothing for many minutes.
"""
from __future__ import annotations

import logging
import sys
import time

PROGRESS_SECONDS = 30.0  # one line per this many seconds at most


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Heartbeat:
    """`beat(done)` logs `what: done/total unit (p%), rate, time left` when PROGRESS_SECONDS have
    passed since the start or the previous line, and only where stderr is no terminal (or
    `enabled` says so)."""

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str = "batches",
                 enabled: bool | None = None) -> None:
        self.log, self.what, self.total, self.unit = log, what, total, unit
        self.enabled = not on_terminal() if enabled is None else enabled
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        """True (and the clock restarted) when a line is due."""
        if not self.enabled:
            return False
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return False
        self.last = now
        return True

    def beat(self, done: int) -> None:
        if not self.due():
            return
        elapsed = max(self.last - self.start, 1e-9)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else float("nan")
        self.log.info("%s: %d/%d %s (%.0f%%), %.3g %s/s, about %s left", self.what, done, self.total, self.unit,
                      100.0 * done / max(self.total, 1), rate, self.unit, duration(left))


def duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet
        return "? s"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
