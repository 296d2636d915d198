"""A run owns its outputs: every run has an id (in `<save>.args.json` and in every checkpoint), and
no run writes into a prefix that holds another run's work, or over a checkpoint it reads.

- A new run (`--save P`) is refused when P holds another run's work (core/outputs.py lists what a
  run writes), naming the files; `--overwrite` removes them first, so two runs never mix. A prefix
  that holds only a log and settings (a run that ended before its first checkpoint) is taken over.
- `--resume CKPT` continues the run of CKPT under that run's own prefix: `CKPT` without its `.N`
  (where the run's files are, or where a copy of them is), else the `--save` the run was started
  with, when its files there are the run's (the run id tells). A prefix is refused when the
  continued run would write over CKPT itself (`cp net.5 backup.pt; --resume backup.pt` would save
  its best checkpoint as backup.pt), over another run's files, or over epochs of the run after
  CKPT's (resuming net.5 while net.6..net.29 exist would replace them): `--save NEW` continues
  (branches) it elsewhere.
"""
from __future__ import annotations

import contextlib
import json
import re
import uuid
from pathlib import Path
from typing import Mapping

import torch

from cellpaint.core.errors import OutputError, UsageError
from cellpaint.core.outputs import RunFiles, check_not_inputs, run_files, same_file

LEGACY = ""  # the id of a run made before runs had ids
UNKNOWN = "?"  # files whose run cannot be read (a damaged args.json or checkpoint)


def new_run_id() -> str:
    return uuid.uuid4().hex


def run_id_of(state: dict) -> str:
    """The id of the run a checkpoint (dict) belongs to (LEGACY for one made before ids)."""
    return state.get("run_id") or LEGACY


def owner(files: RunFiles) -> str | None:
    """The run the files at a prefix belong to: the id in its args.json, else in its newest
    checkpoint (read with mmap: only the small dict, not the weights); None when it holds neither."""
    settings = files.prefix.with_name(files.prefix.name + ".args.json")
    if settings in files.records:
        try:
            recorded = json.loads(settings.read_text())
            return recorded.get("run_id") or LEGACY if isinstance(recorded, dict) else UNKNOWN
        except (OSError, ValueError):
            return UNKNOWN
    newest = files.newest_checkpoint()
    if newest is None:
        return None
    try:
        state = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file: its run cannot be told
        return UNKNOWN
    return run_id_of(state) if isinstance(state, dict) else UNKNOWN


def written_by(prefix: str, first_epoch: int, epochs: int) -> list[str]:
    """The checkpoints a run at `prefix` writes from `first_epoch` on."""
    return [prefix] + [f"{prefix}.{k}" for k in range(first_epoch, epochs)]


def _unusable(prefix: str, checkpoint: str, run_id: str, epoch: int, epochs: int, must_hold_run: bool) -> str | None:
    """Why the run of `checkpoint` (after `epoch`) cannot continue at `prefix`; None when it can."""
    if same_file(prefix, checkpoint):
        twin = f"{prefix}.{epoch}"
        return (f"{checkpoint} would be replaced by the continued run's best checkpoint"
                + (f" (resume the epoch checkpoint {twin} instead: the same epoch)" if Path(twin).is_file() else ""))
    if any(same_file(out, checkpoint) for out in written_by(prefix, epoch + 1, epochs)):
        return f"the continued run's checkpoints at {prefix} would replace {checkpoint} itself"
    files = run_files(prefix)
    found = owner(files)
    if found is None and must_hold_run:
        return f"{prefix} does not hold the run's files"
    if found is not None and found != run_id:
        return f"{prefix} holds the files of another run ({files.summary()})"
    later = sorted(k for k in files.epochs if k > epoch)
    if later:
        shown = f"epoch {later[0]}" if len(later) == 1 else f"epochs {later[0]}..{later[-1]}"
        return (f"{prefix} already holds {shown} of this run, after {checkpoint}'s epoch {epoch}: resume the newest, "
                f"{files.epochs[later[-1]]}")
    return None


def resume_prefix(checkpoint: str, state: dict, save: str | None) -> str:
    """Where the run of `checkpoint` (its dict `state`) continues: `save` when given, else the
    run's own prefix (see the module's notes). An OutputError says why none fits."""
    run_id, epoch = run_id_of(state), int(state.get("epoch", -1))
    epochs = int(((state.get("settings") or {}).get("optim") or {}).get("epochs", epoch + 2))
    if save:
        candidates = [(save, False)]
    else:
        candidates = []
        stripped = re.fullmatch(r"(.+)\.\d+", str(checkpoint))
        # net.5 continues as net.6, ... beside it; any other name (net, backup.pt) would be its best
        # checkpoint and be replaced: that candidate is refused, but says why
        candidates.append((stripped[1] if stripped else str(checkpoint), False))
        started = ((state.get("settings") or {}).get("run") or {}).get("save")
        if started and not any(same_file(started, c) for c, _ in candidates):
            candidates.append((str(started), True))  # only where the run's files are: it may be another place now
    reasons = []
    for prefix, must_hold_run in candidates:
        why = _unusable(prefix, checkpoint, run_id, epoch, epochs, must_hold_run)
        if why is None:
            return prefix
        reasons.append(why)
    if not reasons:
        reasons.append(f"{checkpoint} does not say where its run's outputs go")
    raise OutputError(f"--resume {checkpoint}: {'; '.join(reasons)}; give --save PREFIX to continue the run there")


def claim(prefix: str, run_id: str, resumed: dict | None, overwrite: bool, inputs: Mapping[str, str],
          epochs: int, first_epoch: int) -> str | None:
    """Make `prefix` this run's before anything is written there (the caller holds its lock):
    a new run refuses (or with `overwrite` removes) another run's work; a resumed run (`resumed`:
    its checkpoint path and dict) checks again that the prefix is its own. No output of the run may
    be one of its `inputs` (path -> what reads it). Returns what was replaced, for the run's log."""
    if resumed is not None:
        first_epoch = int(resumed["state"].get("epoch", -1)) + 1
    outputs = written_by(prefix, first_epoch, epochs) + [prefix + s for s in (".log", ".metrics.csv", ".curves.png",
                                                                              ".args.json")]
    check_not_inputs(outputs, inputs, f"--save {prefix}")
    if resumed is not None:
        # the checkpoint's own id: a run made before ids (LEGACY) gets a new one only from now on
        why = _unusable(prefix, resumed["path"], run_id_of(resumed["state"]), int(resumed["state"].get("epoch", -1)),
                        epochs, False)
        if why:
            raise OutputError(f"--resume {resumed['path']}: {why}; give --save PREFIX to continue the run there")
        return None
    files = run_files(prefix)
    if not files.work:
        return (f"--save {prefix}: replacing {files.summary()}, left by a run that saved no checkpoint"
                if files.records else None)
    if not overwrite:
        raise OutputError(f"--save {prefix} holds another run's files ({files.summary()}); choose another "
                          "--save, or add --overwrite to remove them first")
    for path in files.all:
        for source, what in inputs.items():
            if same_file(path, source):
                raise UsageError(f"--overwrite would remove {path}, which this run reads ({what}); copy it "
                                 "elsewhere first, or choose another --save")
    for path in files.all:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return f"--overwrite: removed the {len(files.all)} file(s) of the earlier run at {prefix} ({files.summary()})"

