"""How a run reports: the project's logger, its handlers (stderr and a file beside the outputs) and
expected failures as one line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from cellpaint.engine.distributed import World

log = logging.getLogger("cellpaint")


def setup_logging(path: str | None, world: World, staged: bool = False, append: bool = False,
                  arguments: dict | None = None) -> tuple[str, str] | None:
    """Log to stderr and, when `path` is given, to that file (appended to with `append`, e.g. on
    --resume); `arguments` is logged first.

    Handlers go on the project's logger (not the root), replaced on each call, so that several
    runs in one process (demo.py, tests) each write their own file. A `staged` log (prediction) is
    written to `<path>.partial` and (partial, final) returned: main() renames it over the log of
    the last successful prediction only when this one succeeds, so a failed run keeps that log intact.
    """
    if not world.main:
        path = None  # one log per run: the other processes only report warnings, on stderr
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    files = (f"{path}.partial", path) if path and staged else None
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(files[0] if files else path, mode="a" if append else "w"))
    set_log_handlers(handlers, f" [rank {world.rank}]" if world.distributed else "")
    log.setLevel(logging.INFO if world.main else logging.WARNING)
    log.info("arguments: %s", arguments)
    return files


def set_log_handlers(handlers: list[logging.Handler], rank: str = "") -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("{asctime} {levelname}" + rank + ": {message}", style="{")
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
