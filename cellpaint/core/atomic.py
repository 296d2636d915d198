"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

The one place outputs are written, so the one place a failed write is labelled: any OSError (a
full disk, a read-only directory, a missing permission) comes out as an `OutputError` saying
"cannot write <the path the user asked for>: <reason>", never naming the hidden temporary file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from cellpaint.core.errors import OutputError


def _cannot_write(path: str | os.PathLike, error: OSError) -> OutputError:
    reason = error.strerror or str(error) or type(error).__name__
    return OutputError(f"cannot write {path}: {reason}")


def _staged(path: Path) -> tuple[int, str]:
    """A temporary file beside `path` (same file system: the rename is atomic) with the
    permissions of a normal file (mkstemp makes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was; an OSError
    becomes an OutputError naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = _staged(path)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace `path` with `text`."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_with_companion(path: str | os.PathLike, text: str, companion: str | os.PathLike, companion_text: str) -> None:
    """Replace `path` and the `companion` that describes it (a submission and its scores) so that no
    moment, a kill included, shows a new companion beside an old `path`, or the reverse.

    Both are written in full first; then the old companion is removed, `path` renamed into place,
    and the companion last. Killed in between, `path` stands alone (old or new), never mismatched.
    """
    staged = []
    target = Path(path)
    try:
        for target, content in ((Path(path), text), (Path(companion), companion_text)):
            fd, tmp = _staged(target)
            staged.append(tmp)
            with os.fdopen(fd, "w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        target = Path(companion)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(companion)
        target = Path(path)
        os.replace(staged[0], path)
        target = Path(companion)
        os.replace(staged[1], companion)
    except BaseException as e:
        for tmp in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cannot_write(target, e) from None
        raise
