"""How every command line ends: the one place that turns an exception into one line and an exit status.

    def main(argv=None) -> int:
        return entry.run(lambda: work(argv), report=print_error, debug="--debug" in argv)

`run` calls the command's body; an expected failure (cellpaint/core/errors.py: a CellpaintError,
an OSError, Ctrl-C) is reported as its one line and ends with the status of its kind, anything
else is a bug and keeps its traceback. While the body runs, SIGTERM (what schedulers and `docker
stop` send) raises `errors.Terminated` where Ctrl-C would raise KeyboardInterrupt, so a terminated
run cleans up, says what was kept and how to go on, and exits 143.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

from cellpaint.core import errors


def print_error(line: str) -> None:
    print(f"error: {line}", file=sys.stderr)


def print_line(line: str) -> None:
    print(line, file=sys.stderr)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises errors.Terminated in the main thread while the body runs (then the previous
    handler comes back: tests and demo.py run several commands in one process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise errors.Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(body: Callable[[], int | None], report: Callable[[str], None] = print_error, debug: bool = False,
        interrupted: str = "interrupted", report_interruption: Callable[[str], None] | None = None) -> int:
    """The exit status of `body()` (None counts as 0). An expected failure is `report`ed as one
    line; an interruption (Ctrl-C, SIGTERM) as its own message, or `interrupted` where the body
    did not describe it, through `report_interruption` (default: the line alone on stderr, it is
    no error of the user's). `debug` re-raises instead, for the traceback."""
    try:
        with sigterm_raises():
            return body() or errors.OK
    except errors.EXPECTED as e:
        if debug:
            raise
        if isinstance(e, (KeyboardInterrupt, errors.Interrupted)):
            (report_interruption or print_line)(interrupted if isinstance(e, KeyboardInterrupt) else errors.one_line(e))
        else:
            report(errors.one_line(e))
        return errors.exit_status(e)
