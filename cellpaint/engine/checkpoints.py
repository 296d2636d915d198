"""Checkpoints: what a training run saves each epoch and how it is loaded back, safely.

A checkpoint is a plain dict saved with `torch.save` and read with ``weights_only=True``, so a
file from a stranger cannot run code: model weights, optimizer and grad-scaler state, the epoch,
the best accuracy, the pseudo-labels so far, the metric history and the run's arguments as plain
values. `load_checkpoint` also accepts a bare state dict (for fine-tuning with --load).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from cellpaint.core.atomic import atomic_write
from cellpaint.data.metadata import DataError
from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction

CHECKPOINT_FORMAT = "cellpaint-rcic/1"
# what a checkpoint's saved arguments decide about the network: predict/val rebuild it from them
ARCHITECTURE = ("backbone", "head_hidden", "concat_cell_type", "embedding_size", "bn_mom", "head")


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically: a full disk leaves the previous file in place and says so in one line."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except RuntimeError as e:  # torch's zip writer reports a failed write (ENOSPC) as a RuntimeError
        free = shutil.disk_usage(Path(path).parent).free
        raise DataError(f"cannot write checkpoint {path} ({(str(e).splitlines() or [''])[0][:120]}; "
                        f"{free / 2 ** 20:.0f} MiB free on its disk); the earlier checkpoints are intact") from None


def load_checkpoint(path: str) -> dict:
    """A checkpoint dict (or bare state dict wrapped as one), loaded without unpickling code."""
    if not Path(path).is_file():
        raise DataError(f"checkpoint not found: {path}" + (" (a directory)" if Path(path).is_dir() else ""))
    if Path(path).stat().st_size == 0:  # a save cut short by a full disk or a copy that failed
        raise DataError(f"{path} is not a readable checkpoint (an empty file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise DataError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a checkpoint (holds a {type(state).__name__})")
    if state.get("format") == CHECKPOINT_FORMAT:
        return state
    weights = state.get("model", state.get("state_dict", state))
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise DataError(f"{path} is neither a cellpaint-rcic checkpoint nor a state dict")
    return {"model": weights}


def restore_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load `state`'s weights into `model`, or say in one line why they do not fit it."""
    made_with = state.get("args", {}).get("backbone")
    hint = f"made with --backbone {made_with}" if made_with else "was it made with another --backbone?"
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:  # same names, other shapes: another class count, embedding or backbone width
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise DataError(f"{path} does not fit this model ({first}; {hint})") from None
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"{path} does not fit this model ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected weights, e.g. "
            f"{(result.missing_keys + result.unexpected_keys)[0]}; {hint})")


def plain_value(v):
    """An argument as a plain value (str, number, bool, list or None); None if it has no plain form."""
    if isinstance(v, (LRGroups, LRSchedule, SizeFunction, Path)):
        v = getattr(v, "text", None) or str(v)
    v = list(v) if isinstance(v, tuple) else v
    return v if v is None or isinstance(v, (str, int, float, bool, list)) else None


def checkpoint_args(args) -> dict:
    """The run's parsed arguments as plain values (a checkpoint must load with weights_only=True).
    The namespace holds nothing else: runtime objects live in settings.RunContext."""
    out = {}
    for k, v in vars(args).items():
        if v is None or plain_value(v) is not None:
            out[k] = plain_value(v)
    return out
