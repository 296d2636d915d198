"""What main.py does before a run writes anything: hold its outputs (one run per output, core/runlock.py)
and make sure they are this run's to write (engine/run_owner.py: another run's files, the checkpoint
of --resume), and that none of them is a file this invocation reads."""
from __future__ import annotations

import contextlib
from pathlib import Path

from cellpaint.core import runlock
from cellpaint.core.errors import OutputError
from cellpaint.core.outputs import check_not_inputs
from cellpaint.core.settings import Settings
from cellpaint.data import metadata
from cellpaint.engine import run_owner


def inputs_of(s: Settings) -> dict[str, str]:
    """The files this invocation reads (path -> what reads it): none may be one of its outputs."""
    inputs = {str(path): "the metadata of --data" for path in metadata.input_files(s.data.root)}
    if s.run.mode == "train" and s.run.resume:
        inputs[s.run.resume] = "--resume"
    elif s.run.load:
        inputs[s.run.load] = "--load"
    if s.run.mode == "train" and s.model.pretrained not in ("imagenet", "none") and Path(s.model.pretrained).is_file():
        inputs[s.model.pretrained] = "--pretrained"
    return inputs


def hold(s: Settings, stack: contextlib.ExitStack, checkpoint: dict | None, run_id: str) -> str | None:
    """Lock the outputs of train and predict (one run per output: a second would interleave the log
    and overwrite checkpoints), then make sure they are this run's to write (engine/run_owner.py):
    nothing here is written before that. Returns a note for the run's log."""
    mode, save = s.run.mode, s.run.save
    output = f"{s.run.load}.output{s.inference.pred_suffix}"
    target = (save, f"--save {save}") if mode == "train" else (output, f"the prediction file {output}")
    try:
        Path(target[0]).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {target[0]}: {e.strerror or e}") from None
    stack.enter_context(runlock.hold(f"{target[0]}.lock", target[1]))
    if mode == "predict":
        outputs = [output, f"{output}.log", f"{s.run.load}.embeddings{s.inference.pred_suffix}"]
        check_not_inputs(outputs, inputs_of(s), "--mode predict")
        return None
    resumed = {"path": s.run.resume, "state": checkpoint} if s.run.resume else None
    return run_owner.claim(save, run_id, resumed, s.run.overwrite, inputs_of(s), s.optim.epochs,
                           s.optim.start_epoch)
