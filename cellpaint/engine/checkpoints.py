"""Checkpoints: what a training run saves each epoch and how it is loaded back, safely.

A checkpoint is a plain dict saved with `torch.save` and read with ``weights_only=True``, so a
file from a stranger cannot run code: model weights, optimizer and grad-scaler state, the epoch,
the best accuracy, the pseudo-labels so far, the metric history and the run's resolved settings
as plain values (core/settings.py `settings_dict`). `load_checkpoint` also accepts a bare state
dict (for fine-tuning with --load), and the checks here say when one does not fit the data.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from cellpaint.core.atomic import atomic_write
from cellpaint.core.errors import DataError, InputError, OutputError
from cellpaint.core.settings import Settings
from cellpaint.data import metadata
from cellpaint.engine.data import Data

log = logging.getLogger("cellpaint")

CHECKPOINT_FORMAT = "cellpaint-rcic/2"   # "settings": the resolved settings of the run
LEGACY_FORMATS = ("cellpaint-rcic/1",)   # "args": the parsed command line (main.py converts it)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically: a full disk leaves the previous file in place and says so in one line."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except (RuntimeError, OutputError) as e:  # torch's zip writer reports a failed write (ENOSPC) as a RuntimeError
        reason = (str(e).splitlines() or [''])[0]
        reason = reason.split(": ", 1)[1] if isinstance(e, OutputError) else reason[:120]
        try:
            free = f"; {shutil.disk_usage(Path(path).parent).free / 2 ** 20:.0f} MiB free on its disk"
        except OSError:
            free = ""
        raise OutputError(f"cannot write checkpoint {path} ({reason}{free}); the earlier checkpoints are intact") from None


def load_checkpoint(path: str) -> dict:
    """A checkpoint dict (or bare state dict wrapped as one), loaded without unpickling code."""
    if not Path(path).is_file():
        raise InputError(f"checkpoint not found: {path}" + (" (a directory)" if Path(path).is_dir() else ""))
    if Path(path).stat().st_size == 0:  # a save cut short by a full disk or a copy that failed
        raise InputError(f"{path} is not a readable checkpoint (an empty file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno is None:
            raise InputError(f"{path} is not a readable checkpoint ({e})") from None
        raise InputError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path} is not a checkpoint (holds a {type(state).__name__})")
    if state.get("format") in (CHECKPOINT_FORMAT, *LEGACY_FORMATS):
        _check_recorded(state, path)
        return state
    weights = state.get("model", state.get("state_dict", state))
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise InputError(f"{path} is neither a cellpaint-rcic checkpoint nor a state dict")
    return {"model": weights}


def _check_recorded(state: dict, path: str) -> None:
    """What a cellpaint-rcic checkpoint records beside the weights has the shape the readers expect:
    the settings a dict of groups (each a dict), the first format's arguments a dict, the run id a
    string; anything else (an edited or foreign file) is named here, before any reader trips on it."""
    settings = state.get("settings")
    if "settings" in state and not (isinstance(settings, dict) and all(
            isinstance(v, dict) for k, v in settings.items() if k != "seed")):
        raise InputError(f"{path}: its recorded settings are not a dict of setting groups "
                         f"(found {type(settings).__name__}): an edited or foreign checkpoint")
    if "args" in state and not isinstance(state["args"], dict):
        raise InputError(f"{path}: its recorded arguments are not a dict (found {type(state['args']).__name__})")
    if state.get("run_id") is not None and not isinstance(state["run_id"], str):
        raise InputError(f"{path}: its run id is not a string (found {type(state['run_id']).__name__})")


def made_with(state: dict | None) -> str | None:
    """The backbone a checkpoint was made with (None for a bare weights file)."""
    return ((state or {}).get("settings") or {}).get("model", {}).get("backbone")


def restore_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load `state`'s weights into `model`, or say in one line why they do not fit it."""
    backbone = made_with(state)
    hint = f"made with --backbone {backbone}" if backbone else "was it made with another --backbone?"
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:  # same names, other shapes: another class count, embedding or backbone width
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise InputError(f"{path} does not fit this model ({first}; {hint})") from None
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{path} does not fit this model ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected weights, e.g. "
            f"{(result.missing_keys + result.unexpected_keys)[0]}; {hint})")


def check_classes(data: Data, state: dict | None) -> None:
    if state and "n_classes" in state and state["n_classes"] != data.structure.n_classes:
        raise DataError(f"the checkpoint predicts {state['n_classes']} classes but the data has "
                        f"{data.structure.n_classes} (see --classes)")


def check_channels(data: Data, state: dict | None, path: str | None) -> None:
    """A checkpoint's stem takes the channel count of the data it was trained on (recorded since
    checkpoints record it; an older one fails on its stem's shape in `restore_weights`)."""
    made_for = (state or {}).get("channels")
    if made_for is not None and made_for != data.channels:
        raise DataError(f"{path} was trained on {made_for}-channel images but the sites of this data set have "
                        f"{data.channels} channels ({data.files.describe()})")


def check_data_set(s: Settings, data: Data, state: dict | None) -> str:
    """The data set's fingerprint; a checkpoint made on another data set is refused on --resume (its
    pseudo-labels and history name wells of that one) and named on --load (fine-tuning or
    predicting elsewhere is legitimate, but should not pass unnoticed)."""
    fingerprint = metadata.fingerprint(data.table)
    made_on = (state or {}).get("data_fingerprint")
    if made_on and made_on != fingerprint:
        where = ((state.get("settings") or {}).get("data") or {}).get("root", "?")
        if s.run.resume:
            raise DataError(f"--resume {s.run.resume} was trained on another data set ({where}, fingerprint "
                            f"{made_on}) than --data {s.data.root} (fingerprint {fingerprint}); its "
                            "pseudo-labels and history belong to that one: start a new run with --load")
        log.warning("--load %s was trained on another data set (%s, fingerprint %s) than --data %s (fingerprint %s)",
                    s.run.load, where, made_on, s.data.root, fingerprint)
    return fingerprint
