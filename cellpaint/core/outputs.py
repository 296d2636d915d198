"""What a training run writes under its --save prefix, listed in one place, and the rule that no
command writes over one of its own input files.

A run with `--save P` writes (modes/train.py, main.py):

    P.<epoch>        a checkpoint after every epoch
    P                the best checkpoint so far (a copy of one of them)
    P.log            the log                      P.metrics.csv   one row per epoch
    P.curves.png     the curves                   P.args.json     its resolved settings and run id
    P.lock           held while it runs (core/runlock.py)

and `main.py --mode predict --load P.<epoch>` adds the files made from a checkpoint:
`P.<epoch>.output<suffix>`, `P.<epoch>.embeddings<suffix>` and their logs. `run_files` finds all of
them, so that refusing a prefix that holds another run (`--save`), and removing that run first
(`--overwrite`), cover the same files. Nothing here reads a file: which run they belong to is the
engine's question (engine/run_owner.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from cellpaint.core.errors import OutputError

# <save><suffix>: what a run records beside its checkpoints
RECORDS = (".log", ".metrics.csv", ".curves.png", ".args.json")
LOCK = ".lock"
_EPOCH = re.compile(r"\d+")
# prediction and embeddings files of the run's checkpoints (main.py --mode predict), and their logs
_MADE_FROM = re.compile(r"(\d+\.)?(output|embeddings).*")


@dataclass
class RunFiles:
    """The files a run's prefix holds now (each list sorted, epochs by number)."""
    prefix: Path
    best: Path | None = None
    epochs: dict[int, Path] = field(default_factory=dict)
    records: list[Path] = field(default_factory=list)     # log, metrics, curves, settings
    made_from: list[Path] = field(default_factory=list)   # prediction files of its checkpoints

    @property
    def checkpoints(self) -> list[Path]:
        return ([self.best] if self.best else []) + [self.epochs[k] for k in sorted(self.epochs)]

    @property
    def all(self) -> list[Path]:
        return self.checkpoints + self.records + self.made_from

    @property
    def work(self) -> list[Path]:
        """What a run cannot give back once replaced: checkpoints, metrics, curves, predictions. (A
        log and settings alone are what a run that ended before its first checkpoint leaves.)"""
        kept = [p for p in self.records if not p.name.endswith((".log", ".args.json"))]
        return self.checkpoints + kept + self.made_from

    def summary(self, limit: int = 6) -> str:
        """The files by name, epochs as a range: 'net, net.0..net.29, net.log, net.metrics.csv'."""
        names = [self.best.name] if self.best else []
        if self.epochs:
            first, last = self.epochs[min(self.epochs)].name, self.epochs[max(self.epochs)].name
            names.append(first if first == last else f"{first}..{last}" if len(self.epochs) == max(self.epochs)
                         - min(self.epochs) + 1 else f"{len(self.epochs)} epoch checkpoints {first}..{last}")
        names += [p.name for p in self.records + self.made_from]
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

    def newest_checkpoint(self) -> Path | None:
        return self.epochs[max(self.epochs)] if self.epochs else self.best


def run_files(prefix: str | os.PathLike) -> RunFiles:
    """Every file of the run at `prefix` (see the module's table), the lock left out."""
    prefix = Path(prefix)
    found = RunFiles(prefix)
    try:
        names = os.listdir(prefix.parent if str(prefix.parent) else ".")
    except (FileNotFoundError, NotADirectoryError):
        return found
    start = prefix.name + "."
    for name in sorted(names):
        path = prefix.parent / name
        if name == prefix.name:
            if path.is_file():
                found.best = path
            continue
        if not name.startswith(start):
            continue
        rest = name[len(start):]
        if _EPOCH.fullmatch(rest):
            found.epochs[int(rest)] = path
        elif "." + rest in RECORDS:
            found.records.append(path)
        elif _MADE_FROM.fullmatch(rest) and not rest.endswith((".tmp", LOCK)):
            found.made_from.append(path)
    return found


def describe(paths: Iterable[os.PathLike], limit: int = 4) -> str:
    """A few paths for a message: 'net, net.0, net.1 and 5 more'."""
    paths = [str(p) for p in paths]
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name one file: the same path once links and '..' are resolved, or (both
    existing) the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def check_not_inputs(outputs: Iterable[str | os.PathLike], inputs: Mapping[str | os.PathLike, str],
                     command: str = "this command") -> None:
    """Refuse (OutputError) when one of `outputs` is one of `inputs` (path -> what reads it, e.g.
    'a prediction file', '--load'): a command never writes over a file it reads."""
    for out in outputs:
        for path, what in inputs.items():
            if same_file(out, path):
                shown = str(out) if os.path.realpath(out) == os.path.realpath(path) else f"{out} ({path})"
                raise OutputError(f"{command} would write {shown} over its own input ({what}); "
                                  "choose another output path")
