"""A local weights file for a timm backbone, checked: timm loads a file of another model with a warning
listing every key and goes on with random weights (it loads non-strictly once the classifier is
dropped); here that is refused in one line, as the torchvision path refuses it (backbones.py)."""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import nn


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


@contextlib.contextmanager
def quiet_timm(quiet: bool) -> Iterator[None]:
    """Without timm's warning listing every key of a weights file that does not fit (a line of
    thousands of characters): `timm_file_problem` says it in one line instead."""
    logger = logging.getLogger("timm")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_weights_file(path: str) -> Mapping:
    """A weights file as timm reads it: safetensors, or a torch file (weights only) whose state dict may
    sit under 'state_dict_ema', 'model_ema', 'state_dict' or 'model', with DDP's 'module.' prefixes."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        obj = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()} if isinstance(obj, Mapping) else {}


def timm_file_problem(model: nn.Module, name: str, path: str) -> str | None:
    """Why the weights file `path` does not fit the timm `model` (None: it does). Every weight of the
    model but its stem (adapted to the channels) must be in the file, after the model family's own
    key conversion where timm has one."""
    try:
        state = _read_weights_file(path)
    except Exception as err:  # noqa: BLE001 - timm read it a moment ago; any failure now is the file's
        return f"pretrained weights file {path} cannot be read again ({_first_line(err)})"
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state = convert(state, model)
        except Exception:  # noqa: BLE001 - a converter for other layouts: the names are compared as they are
            pass
    stems = model.pretrained_cfg.get("first_conv") or ()
    stems = {f"{stem}.weight" for stem in ((stems,) if isinstance(stems, str) else stems)}
    absent = [k for k in model.state_dict() if k not in state and k not in stems and not k.endswith("num_batches_tracked")]
    if absent:
        return (f"pretrained weights file {path} does not fit timm backbone {name!r}: {len(absent)} of its "
                f"{len(model.state_dict())} weights are not in the file (e.g. {absent[0]}); {len(state)} others are")
    return None
