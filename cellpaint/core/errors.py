"""The project's errors: one base type, a few kinds, and the exit status of each.

Every exception the project raises on purpose derives from `CellpaintError`: an expected failure
that a command reports as one line (`error: ...`, no traceback; `--debug` of main.py re-raises
it) and ends with the status `exit_status` gives it. The kinds:

    CellpaintError      the run could not be done as asked                          exit status 1
      DataError         the data set: its metadata, images or derived structure     1
      InputError        a file given to a command (checkpoint, prediction file,    1
                        metrics CSV) that is missing, unreadable or refused
      OutputError       an output that cannot be written (full disk, read-only      1
                        directory), that another run holds, or that is one of
                        the command's own inputs
      Diverged          a training run whose loss stopped being finite               1
      UsageError        the command line cannot work as written: a flag's value,    2
                        flags together, a flag that contradicts its checkpoint or
                        does not fit the data (argparse's own errors exit 2 too)
      Interrupted       Ctrl-C (SIGINT, 130) or SIGTERM (143), with what to do next  130 / 143

Module-specific classes (PredictionFileError, ImageError, ...) derive from one of these, and
keep a builtin base where callers catch them so (DataError is also a ValueError).

The exit statuses, the same for every command (main.py, make_submission.py, prepare.py,
synthetic.py, demo.py, python -m tools.*): 0 done; 1 failed (one of the kinds above, an OSError
reading or writing a file); 2 the command line is wrong; 130 interrupted; 143 terminated.
`cellpaint/cli/entry.py` is the one place that turns an exception into that line and status.
"""
from __future__ import annotations

import re

OK = 0
FAILED = 1
USAGE = 2
INTERRUPTED = 130
TERMINATED = 143


class CellpaintError(Exception):
    """An expected failure: the run could not be done as asked. One line for the user; exit status 1."""


class DataError(CellpaintError, ValueError):
    """A problem with the user's data set: the message names the file and what is wrong."""


class InputError(CellpaintError):
    """A file given to a command that is missing, unreadable or refused; the message names it."""


class OutputError(CellpaintError):
    """An output that cannot be written, that another run holds, or that would replace one of the
    command's inputs; the message names it."""


class Diverged(CellpaintError, FloatingPointError):
    """Training stopped because its loss was not finite for too long."""


class UsageError(CellpaintError):
    """A command line that cannot work as written (a flag's value, or flags together); exit status 2,
    like argparse's own usage errors."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and `docker stop` send), raised where Ctrl-C would be, so that the
    same clean-up and the same one line follow (cli/entry.py installs the handler)."""


class Interrupted(CellpaintError):
    """A run stopped by Ctrl-C or SIGTERM; the message says what was kept and how to go on."""

    def __init__(self, message: str, signal_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.status = TERMINATED if isinstance(signal_error, Terminated) else INTERRUPTED


EXPECTED = (CellpaintError, OSError, KeyboardInterrupt, FloatingPointError)


def exit_status(error: BaseException) -> int:
    """The exit status of a command that stops on `error` (see the module's table)."""
    if isinstance(error, Interrupted):
        return error.status
    if isinstance(error, Terminated):
        return TERMINATED
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, UsageError):
        return USAGE
    return FAILED


def one_line(error: BaseException) -> str:
    """An expected failure as one line. Reads and writes are labelled where they happen ("cannot
    read PATH", "cannot write PATH": core/atomic.py and the readers raise InputError, DataError or
    OutputError); an OSError that still gets here unlabelled names its file and reason, without
    guessing whether it was read or written. A data-loader worker's error comes back wrapped in the
    worker's traceback (torch re-raises it with the traceback as the message): only its last line
    is kept. Otherwise the message's first line."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error)
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", text)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
