"""One error type: every exception class of the project derives from CellpaintError, and one
function says the exit status of each kind."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from cellpaint.core import errors
from cellpaint.core.errors import CellpaintError, UsageError, exit_status

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
            "PretrainedUnavailable", "ImageError", "CacheError", "OutputDirError", "ShowError", "Busy"} <= names
    assert [c.__name__ for c in classes if not issubclass(c, CellpaintError)] == []


def test_old_builtin_bases_stay_for_the_callers_that_catch_them():
    from cellpaint.data.metadata import DataError
    from cellpaint.engine.distributed import LaunchError
    from model import PretrainedUnavailable
    from synthetic import OutputDirError

    assert issubclass(DataError, ValueError) and issubclass(LaunchError, RuntimeError)
    assert issubclass(PretrainedUnavailable, RuntimeError) and issubclass(OutputDirError, FileExistsError)


@pytest.mark.parametrize("error, status", [
    (CellpaintError("x"), errors.FAILED), (UsageError("x"), errors.USAGE), (OSError(28, "full"), errors.FAILED),
    (FloatingPointError("nan"), errors.FAILED), (KeyboardInterrupt(), errors.INTERRUPTED)])
def test_exit_status_by_kind(error, status):
    assert exit_status(error) == status


def test_data_errors_fail_and_flag_errors_are_usage():
    from cellpaint.data.metadata import DataError
    from cellpaint.data.prediction_file import PredictionFileError
    from cellpaint.cli.resume import FlagError
    from cellpaint.engine.distributed import LaunchError

    assert [exit_status(c("x")) for c in (DataError, PredictionFileError, FlagError, LaunchError)] == [1, 1, 2, 2]


def test_one_line():
    assert errors.one_line(OSError(28, "No space left on device", "/out/sub.csv")) == \
        "cannot write /out/sub.csv: No space left on device"
    wrapped = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n  File \"x.py\", line 1\ncellpaint.data.metadata.DataError: a.png: truncated\n")
    assert errors.one_line(wrapped) == "a.png: truncated"
    assert errors.one_line(CellpaintError("first\nsecond")) == "first"
    assert errors.one_line(CellpaintError()) == "CellpaintError"
