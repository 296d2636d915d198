"""The project's one error type, and what each command's exit status says.

Every exception the project raises on purpose derives from `CellpaintError`: an expected failure
that a command reports as one line (`error: ...`, no traceback; `--debug` of main.py re-raises
it) and ends with the status `exit_status` gives it. The kinds:

    CellpaintError          the run could not be done: bad data or metadata, an unreadable or
                            refused input file (checkpoint, prediction file, image), an output
                            already in use, ...                                    exit status 1
      UsageError            the command line cannot work as written: a flag that contradicts the
                            checkpoint it resumes, an output path that names a directory, more
                            processes than GPUs, ... (argparse's own errors exit 2 too)   status 2

The classes of the modules keep their own names and, where callers catch them so, their old
builtin base as well (DataError is a CellpaintError and a ValueError).

The exit statuses, the same for every command (main.py, make_submission.py, prepare.py,
synthetic.py, python -m tools.*):

    0    done
    1    the run could not be done (a CellpaintError; also a full disk or unwritable output
         (OSError) and a training run that diverged (FloatingPointError)); main.py --mode check:
         the data set has problems
    2    the command line is wrong (argparse's usage errors, a UsageError)
    130  interrupted (Ctrl-C, SIGINT)
"""
from __future__ import annotations

import re

OK = 0
FAILED = 1
USAGE = 2
INTERRUPTED = 130


class CellpaintError(Exception):
    """An expected failure: the run could not be done as asked. One line for the user; exit status 1."""


class UsageError(CellpaintError):
    """A command line that cannot work as written (a flag's value, or flags together); exit status 2,
    like argparse's own usage errors."""


def exit_status(error: BaseException) -> int:
    """The exit status of a command that stops on `error` (see the module's table)."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, UsageError):
        return USAGE
    return FAILED


def one_line(error: BaseException) -> str:
    """An expected failure as one line. An OSError that names a file (a read-only directory, a full
    disk) says which; a data-loader worker's error comes back wrapped in the worker's traceback
    (torch re-raises it with the traceback as the message): only its last line is kept. Otherwise
    the message's first line (main.py's one_line, now here for every command)."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"cannot write {error.filename}: {error.strerror}"
    text = str(error)
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", text)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
