"""The settings of a run, typed: the command line converted once, at the edge (main.py).

Library code takes these frozen dataclasses, never the argparse namespace. `settings_from_args`
is the one place that reads the parsed arguments; it also resolves what depends on several of
them (e.g. the pixel-statistics cache folder, which used to be derived from --save/--load deep in
the data loading). `RunContext` holds what a run has besides settings: the process group, the
device, the checkpoint loaded while parsing: runtime objects that are never saved.

A checkpoint keeps recording the plain parsed values (checkpoints.checkpoint_args): --resume and
--load (runconfig.py) restore flags from them. `save_settings` writes the resolved settings beside
a training run as `<save>.args.json`, for people and tools to read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dataset
from cellpaint.core.atomic import atomic_write
from cellpaint.engine.checkpoints import plain_value
from cellpaint.engine.distributed import World
from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction


@dataclass(frozen=True)
class DataSettings:
    """What data a run reads and how it is split, normalised and batched."""
    root: Path  # --data
    classes: int | None = None
    use_layout_leak: bool = True
    folds: int = 6
    cv_number: int = 0
    data_split_seed: int = 0
    val_experiments: tuple[str, ...] | None = None
    val_last_experiment: bool = False
    all_controls_train: bool = True
    train_controls: bool = True
    finetune_cell_type: str | None = None
    normalization: str = "sample"
    # where computed pixel statistics are cached: --cache-dir, else `cache` beside --save (or --load)
    stats_cache: Path | None = None
    image_cache: Path | None = None
    skip_bad_images: bool = False
    batch_size: int = 24
    num_workers: int = 0
    seed: int = 0  # the shuffled order and the augmentation draws of each epoch


@dataclass(frozen=True)
class ModelSettings:
    """The network and how the loops run it."""
    backbone: str
    pretrained: str = "imagenet"
    embedding_size: int = 1024
    head_hidden: tuple[int, ...] | None = None
    concat_cell_type: bool = True
    bn_mom: float = 0.05
    stem_init: str = "random"
    head: str = "neck"
    metric_loss_coeff: float = 0.2  # the ArcFace head's weight: 0 or 1 leaves a head without gradient
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False


@dataclass(frozen=True)
class OptimSettings:
    """The objective, the optimizer and the schedule of training."""
    epochs: int
    lr: LRSchedule
    start_epoch: int = 0
    wd: float = 1e-5
    backbone_lr_mult: float = 1.0
    lr_groups: LRGroups | None = None
    gradient_accumulation: int = 1
    accumulation: str = "sum"
    loss: str = "ce"
    loss_classes: str = "all"
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_partners: str = "shared"
    max_bad_steps: int = 50
    disp_batches: int = 50
    seed: int = 0  # the mixing draws


@dataclass(frozen=True)
class PseudoLabelSettings:
    first_epoch: int | None  # --pl-epoch; None: off
    size_func: SizeFunction
    epochs: int
    duplicates: str = "drop"


@dataclass(frozen=True)
class InferenceSettings:
    tta: int = 1
    tta_size: float = 1.0
    tta_random: int = 0
    val_unit: str = "site"
    save_embeddings: bool = False
    pred_suffix: str = ""


@dataclass(frozen=True)
class RunSettings:
    """What this invocation does and where its outputs go."""
    mode: str
    save: str | None = None
    load: str | None = None
    resume: str | None = None
    debug: bool = False


@dataclass(frozen=True)
class Settings:
    data: DataSettings
    model: ModelSettings
    optim: OptimSettings
    augment: dataset.Augment
    pseudo: PseudoLabelSettings
    inference: InferenceSettings
    run: RunSettings


@dataclass
class RunContext:
    """What a run holds besides its settings: runtime objects, passed explicitly and never saved."""
    world: World = field(default_factory=World)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # autocast's, None: fp32
    resume_state: dict | None = None  # the checkpoint of --resume, loaded while parsing
    load_state: dict | None = None  # the checkpoint of --load, loaded while parsing
    epoch_now: int | None = None  # the epoch being trained, for the message of an interruption


def augment_from_args(args: argparse.Namespace) -> dataset.Augment:
    """The train augmentation flags as settings (a ValueError names a flag with a bad value)."""
    return dataset.Augment(min_scale=args.scale_aug, scale_std=args.pw_aug[0], bias_std=args.pw_aug[1],
                           rotate=args.rotate_aug, brightness=args.brightness_aug, contrast=args.contrast_aug,
                           gamma=args.gamma_aug, zoom_mode=args.zoom_interpolation,
                           flips=args.flips != "none", transposes=args.flips == "dihedral", prob=args.aug_prob,
                           rescale=args.rescale_aug, rotate_border=args.rotate_border,
                           bc_space=args.brightness_contrast_space, gamma_range=args.gamma_range)


def stats_cache_dir(args: argparse.Namespace) -> Path | None:
    """The pixel-statistics cache: --cache-dir, else the folder `cache` beside --save (or --load)."""
    if args.cache_dir:
        return Path(args.cache_dir)
    where = args.save or args.load
    return Path(where).parent / "cache" if where else None


def _tuple(v):
    return None if v is None else tuple(v)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The parsed (and checked) command line as typed settings: the one place that converts the
    namespace (main.py calls it once, after resolving --device and --channels-last auto)."""
    data = DataSettings(
        root=Path(args.data), classes=args.classes, use_layout_leak=args.use_layout_leak, folds=args.folds,
        cv_number=args.cv_number, data_split_seed=args.data_split_seed, val_experiments=_tuple(args.val_experiments),
        val_last_experiment=args.val_last_experiment, all_controls_train=args.all_controls_train,
        train_controls=args.train_controls, finetune_cell_type=args.finetune_cell_type,
        normalization=args.data_normalization, stats_cache=stats_cache_dir(args), image_cache=args.image_cache,
        skip_bad_images=args.skip_bad_images, batch_size=args.batch_size, num_workers=args.num_data_workers,
        seed=args.seed)
    model = ModelSettings(
        backbone=args.backbone, pretrained=args.pretrained, embedding_size=args.embedding_size,
        head_hidden=_tuple(args.head_hidden), concat_cell_type=args.concat_cell_type, bn_mom=args.bn_mom,
        stem_init=args.stem_init, head=args.head, metric_loss_coeff=args.metric_loss_coeff,
        channels_last=args.channels_last is True,  # 'auto' is resolved by main() before this
        compile=args.compile, sync_bn=args.sync_bn)
    optim = OptimSettings(
        epochs=args.epochs, lr=args.lr, start_epoch=args.start_epoch, wd=args.wd,
        backbone_lr_mult=args.backbone_lr_mult, lr_groups=args.lr_groups,
        gradient_accumulation=args.gradient_accumulation, accumulation=args.accumulation, loss=args.loss,
        loss_classes=args.loss_classes, label_smoothing=args.label_smoothing, mixup=args.mixup, cutmix=args.cutmix,
        mix_partners=args.mix_partners, max_bad_steps=args.max_bad_steps, disp_batches=args.disp_batches,
        seed=args.seed)
    pseudo = PseudoLabelSettings(first_epoch=args.pl_epoch, size_func=args.pl_size_func, epochs=args.epochs,
                                 duplicates=args.pl_duplicates)
    inference = InferenceSettings(tta=args.tta, tta_size=args.tta_size, tta_random=args.tta_random,
                                  val_unit=args.val_unit, save_embeddings=args.save_embeddings,
                                  pred_suffix=args.pred_suffix)
    run = RunSettings(mode=args.mode, save=args.save, load=args.load, resume=args.resume, debug=args.debug)
    return Settings(data, model, optim, augment_from_args(args), pseudo, inference, run)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None:
        return None
    plain = plain_value(v)
    return str(v) if plain is None else plain


def settings_dict(settings: Settings) -> dict:
    """The settings as plain JSON values, one object per group (schedules as their text)."""
    return {f.name: _plain({g.name: getattr(getattr(settings, f.name), g.name)
                            for g in dataclasses.fields(getattr(settings, f.name))})
            for f in dataclasses.fields(settings)}


def save_settings(path: str, settings: Settings) -> None:
    """Write `settings` as JSON, atomically (a crash leaves the previous file or none)."""
    with atomic_write(path, "w") as f:
        json.dump(settings_dict(settings), f, indent=1)
        f.write("\n")
