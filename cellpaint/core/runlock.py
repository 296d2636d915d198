"""A run owns its --save: a second run on the same path is refused while the first lives.

The lock is `fcntl.flock` on `<save>.lock`: the kernel drops it when its process ends, however it
ends (kill -9, a crash, a reboot), so a lock left by a dead run is simply taken over; the file
also names the holder (pid, host, start time) for the message the second run prints.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from typing import Iterator

from cellpaint.core.errors import OutputError


class Busy(OutputError):
    """Another live run holds the lock."""


@contextlib.contextmanager
def hold(path: str, what: str) -> Iterator[None]:
    """Hold `path` for the body; `what` names the guarded output in the refusal ('--save x')."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # a read-only or missing directory: the run could write nothing there
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise Busy(f"{what} is in use by another run ({holder}); wait for it to end or choose another "
                       f"path (the lock is {path})") from None
        # a run that was ending may have removed the file between our open and flock: then we hold
        # a lock on a file nobody else can see, and must start over on the new one
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding it: a waiting run then re-opens a fresh file
        os.close(fd)
