"""One error type and one way out: every exception class of the project derives from CellpaintError,
each kind has its exit status, and every command line ends through cellpaint/cli/entry.py."""
from __future__ import annotations

import ast
import importlib
import signal
from pathlib import Path

import pytest

from cellpaint.cli import entry
from cellpaint.core import errors
from cellpaint.core.errors import (CellpaintError, DataError, Diverged, InputError, Interrupted, OutputError,
                                   Terminated, UsageError, exit_status)

ROOT = Path(__file__).resolve().parents[1]


def project_exception_classes() -> list[type]:
    """Every class the project's modules define that is an exception (found by reading the sources,
    so a new module or class is checked without a list here to update)."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("cellpaint/**/*.py"), *ROOT.glob("tools/*.py")]
    found = []
    for path in files:
        names = [node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)]
        if not names:
            continue
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        found += [c for c in (getattr(module, n) for n in names) if isinstance(c, type) and issubclass(c, BaseException)]
    return found


def test_every_project_exception_is_a_cellpaint_error():
    classes = project_exception_classes()
    names = {c.__name__ for c in classes}
    assert {"DataError", "FlagError", "LaunchError", "PredictionFileError", "SubmissionError", "KnnError",
            "PretrainedUnavailable", "ImageError", "CacheError", "OutputDirError", "ShowError", "Busy",
            "SiteSizeError"} <= names
    # Terminated is raised where Ctrl-C's KeyboardInterrupt would be: an interruption, not an error
    assert [c.__name__ for c in classes if not issubclass(c, CellpaintError)] == ["Terminated"]


def test_each_class_is_of_the_kind_its_status_says():
    from cellpaint.cli.flags import FlagError
    from cellpaint.core.runlock import Busy
    from cellpaint.data.image_cache import CacheError
    from cellpaint.data.images import ImageError
    from cellpaint.data.prediction_file import PredictionFileError
    from cellpaint.data.synthetic import OutputDirError
    from cellpaint.engine.distributed import LaunchError
    from cellpaint.modes.submission_inputs import SubmissionError

    for cls in (ImageError, CacheError):
        assert issubclass(cls, DataError)
    for cls in (PredictionFileError, SubmissionError):
        assert issubclass(cls, InputError)
    assert issubclass(Busy, OutputError)
    for cls in (FlagError, LaunchError, OutputDirError):  # the command line cannot work as written
        assert issubclass(cls, UsageError) and not issubclass(cls, DataError)


def test_old_builtin_bases_stay_for_the_callers_that_catch_them():
    from cellpaint.data.synthetic import OutputDirError
    from cellpaint.engine.distributed import LaunchError
    from cellpaint.networks.backbones import PretrainedUnavailable

    assert issubclass(DataError, ValueError) and issubclass(LaunchError, RuntimeError)
    assert issubclass(PretrainedUnavailable, RuntimeError) and issubclass(OutputDirError, FileExistsError)


@pytest.mark.parametrize("error, status", [
    (CellpaintError("x"), errors.FAILED), (DataError("x"), errors.FAILED), (InputError("x"), errors.FAILED),
    (OutputError("x"), errors.FAILED), (Diverged("x"), errors.FAILED), (UsageError("x"), errors.USAGE),
    (OSError(28, "full"), errors.FAILED), (FloatingPointError("nan"), errors.FAILED),
    (KeyboardInterrupt(), errors.INTERRUPTED), (Terminated(), errors.TERMINATED),
    (Interrupted("x", KeyboardInterrupt()), errors.INTERRUPTED), (Interrupted("x", Terminated()), errors.TERMINATED)])
def test_exit_status_by_kind(error, status):
    assert exit_status(error) == status


def test_one_line():
    # unlabelled (the readers and core/atomic.py label theirs): the file and the reason, no guess
    # whether it was read or written
    assert errors.one_line(OSError(28, "No space left on device", "/out/sub.csv")) == \
        "/out/sub.csv: No space left on device"
    wrapped = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n  File \"x.py\", line 1\ncellpaint.core.errors.DataError: a.png: truncated\n")
    assert errors.one_line(wrapped) == "a.png: truncated"
    assert errors.one_line(CellpaintError("first\nsecond")) == "first"
    assert errors.one_line(CellpaintError()) == "CellpaintError"


# ------------------------------------------------------------------------- every command, one way out

# (module, argv that parses, the function that does the work once the arguments are parsed)
COMMANDS = [
    ("main", ["--save", "x", "--device", "cpu"], "run"),
    ("make_submission", ["-o", "sub.csv", "f.output"], "submit"),
    ("prepare", ["--cache", "c"], "prepare"),
    ("synthetic", ["out"], "write"),
    ("demo", [], "demo"),
    ("wilds_demo", [], "demo"),
    ("tools.curves", ["m.csv"], "draw_curves"),
    ("tools.merge_predictions", ["-o", "m.output", "a.output"], "write_merged"),
    ("tools.show", ["--data", "d"], "show"),
]
KINDS = [(UsageError("bad flag"), 2, "bad flag"), (DataError("bad data"), 1, "bad data"),
         (InputError("bad input"), 1, "bad input"), (OutputError("cannot write x"), 1, "cannot write x"),
         (PermissionError(13, "Permission denied", "f"), 1, "f: Permission denied"),
         (Interrupted("stopped; go on with y"), 130, "stopped; go on with y"),
         (KeyboardInterrupt(), 130, "interrupted"), (Terminated(), 143, "interrupted")]


@pytest.mark.parametrize("module, argv, body", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_ends_through_the_one_wrapper(module, argv, body, monkeypatch, capsys, caplog, tmp_path):
    """Each command's work raises each kind of failure in turn: the status is the kind's, the one
    line (on stderr, or in the log for main.py) says it, and a bug keeps its traceback."""
    monkeypatch.chdir(tmp_path)
    command = importlib.import_module(module)
    calls = []
    real_run = entry.run
    monkeypatch.setattr(entry, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    for error, status, line in KINDS:
        def fail(*_, error=error):
            raise error
        monkeypatch.setattr(command, body, fail)
        caplog.clear()
        assert command.main(list(argv)) == status, (module, error)
        said = capsys.readouterr().err + caplog.text
        assert line in said and "Traceback" not in said, (module, error, said)
    assert len(calls) == len(KINDS)

    def bug(*_):
        raise TypeError("a bug")
    monkeypatch.setattr(command, body, bug)
    with pytest.raises(TypeError):
        command.main(list(argv))


def test_sigterm_raises_terminated_only_while_a_command_runs():
    before = signal.getsignal(signal.SIGTERM)

    def body():
        signal.raise_signal(signal.SIGTERM)

    assert entry.run(body) == errors.TERMINATED
    assert signal.getsignal(signal.SIGTERM) is before
