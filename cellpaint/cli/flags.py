"""main.py's flags and the settings they set: the conversion at the edge, and what a checkpoint
gives back on --resume and --load.

`FIELDS` says which setting each flag sets (a few set two). It is the one place that knows both
the command line and the settings, so everything below is generic over it:

- `settings_from_args`: the parsed arguments as typed Settings (cellpaint/core/settings.py);
- `typed_flags`: which flags the user typed (on the line or in an @file), not left at their defaults;
- `resume`: the checkpoint's settings, with what the user typed where that may differ: where and
  how this invocation runs (the `exec` group, never taken from the checkpoint: the machine may
  have changed) and `MAY_CHANGE`; a typed flag that contradicts the checkpoint is refused;
- `take_architecture`: --load builds the network as the checkpoint's was;
- `complete`: the defaults that depend on other settings (the head's), once they are all known;
- `problems`: settings that cannot work together, named by their flags.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import torch

from cellpaint.core.errors import UsageError
from cellpaint.core.settings import (ARCHITECTURE, AUTO, AugmentSettings, DataSettings, ExecSettings,
                                     InferenceSettings, ModelSettings, OptimSettings, PseudoLabelSettings, RunSettings,
                                     Settings, plain_value)
from cellpaint.networks.backbones import is_supported_backbone, supported_backbones
from dataset import tta_views

# flag (argparse dest) -> the settings it sets, as "group.field"
FIELDS: dict[str, tuple[str, ...]] = {
    "mode": ("run.mode",), "save": ("run.save",), "load": ("run.load",), "resume": ("run.resume",),
    "overwrite": ("run.overwrite",), "normalise": ("run.normalise",), "evaluate": ("run.evaluate",),
    "seed": ("seed",),
    # the model
    "backbone": ("model.backbone",), "pretrained": ("model.pretrained",), "head_hidden": ("model.head_hidden",),
    "head": ("model.head",), "concat_cell_type": ("model.concat_cell_type",),
    "embedding_size": ("model.embedding_size",), "bn_mom": ("model.bn_mom",), "stem_init": ("model.stem_init",),
    "bottleneck_bn": ("model.bottleneck_bn",),
    # training
    "metric_loss_coeff": ("optim.metric_loss_coeff",), "loss": ("optim.loss",), "loss_classes": ("optim.loss_classes",),
    "epochs": ("optim.epochs",), "gradient_accumulation": ("optim.gradient_accumulation",),
    "accumulation": ("optim.accumulation",), "lr": ("optim.lr",), "backbone_lr_mult": ("optim.backbone_lr_mult",),
    "lr_groups": ("optim.lr_groups",), "wd": ("optim.wd",), "label_smoothing": ("optim.label_smoothing",),
    "mixup": ("optim.mixup",), "cutmix": ("optim.cutmix",), "mix_partners": ("optim.mix_partners",),
    "start_epoch": ("optim.start_epoch",), "model_ema": ("optim.model_ema",),
    "image_size_schedule": ("optim.image_size_schedule",),
    # augmentation
    "pw_aug": ("augment.scale_std", "augment.bias_std"), "scale_aug": ("augment.min_scale",),
    "zoom_interpolation": ("augment.zoom_mode",), "rotate_aug": ("augment.rotate",),
    "brightness_aug": ("augment.brightness",), "contrast_aug": ("augment.contrast",), "gamma_aug": ("augment.gamma",),
    "flips": ("augment.flips", "augment.transposes"), "aug_prob": ("augment.prob",),
    "rescale_aug": ("augment.rescale",), "rotate_border": ("augment.rotate_border",),
    "brightness_contrast_space": ("augment.bc_space",), "gamma_range": ("augment.gamma_range",),
    # pseudo-labelling
    "pl_epoch": ("pseudo.first_epoch",), "pl_size_func": ("pseudo.size_func",), "pl_duplicates": ("pseudo.duplicates",),
    # data
    "data": ("data.root",), "classes": ("data.classes",), "cv_number": ("data.cv_number",), "folds": ("data.folds",),
    "val_experiments": ("data.val_experiments",), "val_last_experiment": ("data.val_last_experiment",),
    "data_split_seed": ("data.data_split_seed",), "data_normalization": ("data.normalization",),
    "all_controls_train": ("data.all_controls_train",), "train_controls": ("data.train_controls",),
    "use_layout_leak": ("data.use_layout_leak",), "finetune_cell_type": ("data.finetune_cell_type",),
    "batch_size": ("data.batch_size",), "batch_sampling": ("data.batch_sampling",), "split": ("data.split",),
    # inference
    "tta": ("inference.tta",), "tta_size": ("inference.tta_size",), "tta_random": ("inference.tta_random",),
    "val_unit": ("inference.val_unit",), "pred_suffix": ("inference.pred_suffix",),
    "save_embeddings": ("inference.save_embeddings",), "adabn": ("inference.adabn",),
    "inference_weights": ("inference.weights",),
    # where and how this invocation runs
    "device": ("exec.device",), "fp16": ("exec.fp16",), "precision": ("exec.precision",),
    "channels_last": ("exec.channels_last",), "compile": ("exec.compile",), "sync_bn": ("exec.sync_bn",),
    "threads": ("exec.threads",), "num_data_workers": ("exec.num_workers",), "image_cache": ("exec.image_cache",),
    "cache_dir": ("exec.stats_cache",), "skip_bad_images": ("exec.skip_bad_images",),
    "disp_batches": ("exec.disp_batches",), "max_bad_steps": ("exec.max_bad_steps",),
}
# flags of the command line itself, not settings
COMMAND_ONLY = ("debug",)
# settings --resume takes from what the user typed when given (else from the checkpoint): the data
# may have moved (the same data set, checked by its fingerprint), and the views of inference
MAY_CHANGE = ("data.root", "inference.tta", "inference.tta_size", "inference.pred_suffix",
              "inference.save_embeddings")
# the groups of one invocation: never taken from a checkpoint
THIS_INVOCATION = ("exec", "run")


class FlagError(UsageError):
    """A flag that contradicts the checkpoint it is used with (exit status 2, like argparse)."""


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# ------------------------------------------------------------------------------- the conversion


def _convert(dest: str, value):
    """A flag's parsed value as the values of its settings, in FIELDS order."""
    if dest == "pw_aug":
        return tuple(value)
    if dest == "flips":
        return value != "none", value == "dihedral"
    if isinstance(value, list):
        value = tuple(value)
    if dest in ("data", "image_cache", "cache_dir") and value is not None:
        value = Path(value)
    return (value,)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The parsed command line as Settings (what depends on other settings not yet filled in:
    `complete` does that once a checkpoint's settings are merged in)."""
    groups: dict[str, dict] = {}
    for dest, fields in FIELDS.items():
        for field, value in zip(fields, _convert(dest, getattr(args, dest))):
            group, _, name = field.rpartition(".")
            groups.setdefault(group, {})[name] = value
    seed = groups.pop("")["seed"]
    classes = {"data": DataSettings, "model": ModelSettings, "optim": OptimSettings, "augment": AugmentSettings,
               "pseudo": PseudoLabelSettings, "inference": InferenceSettings, "exec": ExecSettings, "run": RunSettings}
    return Settings(**{name: cls(**groups[name]) for name, cls in classes.items()}, seed=seed)


def get(settings: Settings, field: str):
    group, _, name = field.rpartition(".")
    return getattr(getattr(settings, group), name) if group else getattr(settings, name)


def with_fields(settings: Settings, values: dict[str, object]) -> Settings:
    """`settings` with the fields of `values` ("group.field" -> value) replaced."""
    groups: dict[str, dict] = {}
    top = {}
    for field, value in values.items():
        group, _, name = field.rpartition(".")
        if group:
            groups.setdefault(group, {})[name] = value
        else:
            top[name] = value
    return settings.replace(**groups, **top)


def complete(settings: Settings) -> Settings:
    """Fill in what depends on other settings: the cell-type one-hot and the ArcFace weight follow
    the head (the 1st place's neck: on and 0.2; the 41st place's plain head: off and 0), and the
    pixel-statistics cache sits beside the outputs unless --cache-dir says otherwise."""
    plain = settings.model.head == "plain"
    model, optim, exec_ = settings.model, settings.optim, settings.exec
    changes: dict[str, object] = {}
    if model.concat_cell_type is None:
        changes["model.concat_cell_type"] = not plain
    if optim.metric_loss_coeff is None:
        changes["optim.metric_loss_coeff"] = 0.0 if plain else 0.2
    if exec_.stats_cache is None:
        where = settings.run.save or settings.run.load
        if where:
            changes["exec.stats_cache"] = Path(where).parent / "cache"
    return with_fields(settings, changes)


# ------------------------------------------------------------------------- what the user typed


def typed_flags(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> set[str]:
    """The dests the user typed (on the line or in an @file), whatever their value: the line is
    parsed again into a namespace whose every dest already holds a marker (argparse fills in a
    default only where the namespace has none), and what still holds the marker was not typed."""
    parser = build_parser()
    marker = object()
    dests = vars(parser.parse_args(list(argv)))
    parsed = parser.parse_args(list(argv), namespace=argparse.Namespace(**{dest: marker for dest in dests}))
    return {dest for dest, value in vars(parsed).items() if value is not marker}


def origin(flag: str | None, argv: Sequence[str], aliases: dict[str, list[str]]) -> str:
    """Where a flag's value came from: typed on the command line (under any of its `aliases`,
    dest -> option strings), read from an @file, or its default."""
    names = aliases.get((flag or "").lstrip("-").replace("-", "_"), [flag] if flag else [])
    if flag is None or any(a == name or a.startswith(name + "=") for a in argv for name in names):
        return "on the command line"
    files = [a[1:] for a in argv if a.startswith("@")]
    return f"from {', '.join('@' + f for f in files)}" if files else "its default"


def _show(value) -> str:
    value = plain_value(value)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _contradiction(dest: str, typed: Settings, saved: Settings, fields: tuple[str, ...]) -> bool:
    return any(plain_value(get(typed, f)) != plain_value(get(saved, f)) for f in fields)


def _flag_value(dest: str, settings: Settings) -> str:
    fields = FIELDS[dest]
    if dest == "flips":
        flips, transposes = (get(settings, f) for f in fields)
        return "dihedral" if transposes else "hv" if flips else "none"
    return ",".join(_show(get(settings, f)) for f in fields)


def resume(current: Settings, saved: Settings, typed: set[str], path: str) -> Settings:
    """The run of checkpoint `path` continued: its `saved` settings, except this invocation's
    groups and the typed flags of MAY_CHANGE; a typed flag that contradicts it is refused."""
    values = {}
    for dest, fields in FIELDS.items():
        if fields[0].split(".")[0] in THIS_INVOCATION:
            continue
        if dest in typed and all(f in MAY_CHANGE for f in fields):
            continue
        if dest in typed and _contradiction(dest, current, saved, fields):
            raise FlagError(
                f"{flag_name(dest)} {_flag_value(dest, current)} contradicts --resume {path}, which was run with "
                f"{flag_name(dest)} {_flag_value(dest, saved)}; leave the flag out to continue that run (to change "
                f"it, start a new run with --load {path} --start-epoch N)")
        values.update({f: get(saved, f) for f in fields})
    return with_fields(current, values)


def take_architecture(current: Settings, saved: Settings, typed: set[str], path: str) -> Settings:
    """--load: the network is built as the checkpoint's was; a typed architecture flag that says
    otherwise is refused (the weights would not fit it)."""
    values = {}
    for name in ARCHITECTURE:
        field = f"model.{name}"
        dest = next(d for d, fields in FIELDS.items() if field in fields)
        if dest in typed and _contradiction(dest, current, saved, (field,)):
            raise FlagError(f"{flag_name(dest)} {_flag_value(dest, current)} contradicts --load {path}, which was "
                             f"made with {flag_name(dest)} {_flag_value(dest, saved)}; leave the flag out: --load "
                             "takes the architecture from the checkpoint")
        values[field] = get(saved, field)
    return with_fields(current, values)


def overwrite_problem(mode: str, resume: str | None) -> str | None:
    """--overwrite is for a new training run only (checked before a checkpoint is read, too)."""
    if mode == "train" and not resume:
        return None
    return ("--overwrite starts a new training run at --save afresh: it does not go with "
            + ("--resume (to branch a run from an earlier epoch, --resume it with --save NEW_PREFIX)"
               if resume else f"--mode {mode}"))


DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_problem(text: str | None) -> str | None:
    """Why `--device text` cannot run here (None: it can, or none was given: cuda if available)."""
    if text is None:
        return None
    try:
        device = torch.device(text)
    except RuntimeError:  # torch's own parse of the name: any text it cannot read as a device
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        return f"--device {text}: not a device this trainer runs on; choose cpu, cuda, cuda:N or mps"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return f"--device {text}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu"
        if device.index is not None and device.index >= count:
            return f"--device {text}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {text}: Apple's MPS is not available here; use --device cpu"
    return None


def problems(s: Settings) -> str | None:
    """The first way the settings (flags merged with a checkpoint's) cannot work together, named by
    their flags; None when they can."""
    m, o, d, inf = s.model, s.optim, s.data, s.inference
    device = device_problem(s.exec.device)
    if device:
        return device
    if s.run.overwrite:
        problem = overwrite_problem(s.run.mode, s.run.resume)
        if problem:
            return problem
    if m.head == "plain":
        given = [flag for flag, on in (("--concat-cell-type true", m.concat_cell_type),
                                       ("--metric-loss-coeff > 0", (o.metric_loss_coeff or 0) > 0),
                                       ("--head-hidden", m.head_hidden)) if on]
        if given:
            return f"--head plain has no cell-type one-hot, ArcFace head or hidden layers: drop {', '.join(given)}"
    if o.loss_classes == "treatment" and d.train_controls:
        return "--loss-classes treatment leaves the control classes out of the loss: add --train-controls false"
    if d.val_last_experiment and (d.val_experiments or d.cv_number == -1):
        return "--val-last-experiment chooses the validation experiments: drop --val-experiments / --cv-number -1"
    if inf.tta_random < 0 or (inf.tta_random and inf.tta > 1):
        return "--tta-random N (N >= 0) replaces --tta: give one of them"
    if d.val_experiments and d.cv_number == -1:
        return "--val-experiments names validation experiments; --cv-number -1 trains on all of them"
    if not -1 <= d.cv_number < d.folds:
        return f"--cv-number must be -1 or in [0, {d.folds}), got {d.cv_number}"
    if s.run.mode == "train" and not s.run.resume and o.start_epoch >= o.epochs:
        return f"--start-epoch {o.start_epoch} leaves no epoch to train: it must be below --epochs {o.epochs}"
    if s.pseudo.first_epoch is not None and not 0 <= s.pseudo.first_epoch < o.epochs:
        return f"--pl-epoch must be in [0, {o.epochs}), got {s.pseudo.first_epoch}"
    training = s.run.mode == "train"
    if training and d.batch_sampling != "random" and m.concat_cell_type:
        return (f"--batch-sampling {d.batch_sampling} gives batches of one cell type, where the neck's BatchNorm "
                "over the cell-type one-hot sees no variance (its statistics would break inference): add "
                "--concat-cell-type false")
    if training and o.image_size_schedule is not None and o.image_size_schedule.last_epoch >= o.epochs:
        return (f"--image-size-schedule {o.image_size_schedule}: epoch {o.image_size_schedule.last_epoch} is not "
                f"before the end of training (-e/--epochs {o.epochs})")
    if training and inf.weights == "ema" and o.model_ema is None:
        return "--inference-weights ema needs --model-ema DECAY in training (there are no EMA weights otherwise)"
    try:
        tta_views(torch.zeros(1, 1, 8, 8), inf.tta, inf.tta_size)
    except ValueError as e:
        return str(e)
    if m.backbone != AUTO and not is_supported_backbone(m.backbone):
        return (f"--backbone {m.backbone!r} is not supported; choose from: auto, {', '.join(supported_backbones())}, "
                "or timm-NAME for any NAME of timm.list_models()")
    return None


def may_change_flags() -> list[str]:
    """The flags --resume accepts with another value than the checkpoint's (listed in --help)."""
    return [flag_name(dest) for dest, fields in FIELDS.items()
            if fields[0].split(".")[0] == "exec" or all(f in MAY_CHANGE for f in fields)]
