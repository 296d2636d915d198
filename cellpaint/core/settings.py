"""The settings of a run, typed: what the command lines convert their arguments into, once.

Library code takes these frozen dataclasses, never an argparse namespace (the conversion is
cellpaint/cli/flags.py's). A checkpoint stores its run's settings as plain values
(`settings_dict`), with every "auto" already settled (engine/setup.py `resolve`), and `--resume`
and `--load` rebuild them from there (`settings_from_dict`) before applying what the user typed.

Groups: what data and how it is split (`DataSettings`), the network (`ModelSettings`), the
objective and optimizer (`OptimSettings`), the train augmentation (`AugmentSettings`),
pseudo-labelling, inference, where and how this invocation executes (`ExecSettings`: the
machine may differ on --resume) and what it does and writes (`RunSettings`). The submission
builder has its own (`SubmissionSettings`).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from cellpaint.core.atomic import atomic_write
from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction

AUTO = "auto"
PRECISIONS = ("fp16", "bf16", "fp32")


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
    batch_size: int = 24


# the fields of ModelSettings that decide the network's shape: --load takes them from the checkpoint
ARCHITECTURE = ("backbone", "head_hidden", "concat_cell_type", "embedding_size", "bn_mom", "head")


@dataclass(frozen=True)
class ModelSettings:
    """The network, and how fresh weights start."""
    backbone: str = AUTO
    pretrained: str = "imagenet"
    embedding_size: int = 1024
    head_hidden: tuple[int, ...] | None = None
    concat_cell_type: bool | None = True  # None (from main.py's conversion): by the head
    bn_mom: float = 0.05
    stem_init: str = "random"
    head: str = "neck"
    bottleneck_bn: str = "recomputed"  # how DenseNet bottleneck BN statistics move (model.set_bottleneck_bn)


@dataclass(frozen=True)
class OptimSettings:
    """The objective, the optimizer and the schedule of training."""
    epochs: int = 90
    lr: LRSchedule = LRSchedule.parse("cosine,1.5e-4")
    start_epoch: int = 0
    wd: float = 1e-5
    backbone_lr_mult: float = 1.0
    lr_groups: LRGroups | None = None
    gradient_accumulation: int = 1
    accumulation: str = "sum"
    loss: str = "ce"
    loss_classes: str = "all"
    # the ArcFace head's weight: 0 or 1 leaves a head without gradient; None (from main.py's conversion): by the head
    metric_loss_coeff: float | None = 0.2
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_partners: str = "shared"


ZOOM_MODES = ("nearest", "bilinear")
ROTATE_BORDERS = ("zeros", "reflect", "reflect-101")
FLIP_SETS = ("dihedral", "hv", "none")
BC_SPACES = ("normalised", "raw")


@dataclass(frozen=True)
class AugmentSettings:
    """Train-time augmentation (SPEC): dihedral flips, zoom crop, per-channel gain/offset; optionally
    (the 41st-place recipe, off by default) rescale, rotation, gamma, brightness and contrast,
    each applied with probability `prob`. cellpaint/data/augment.py draws and applies them."""
    flips: bool = True
    min_scale: float = 1.0          # --scale-aug: zoom crop edge drawn from [min_scale, 1]
    scale_std: float = 0.0          # --pw-aug first value
    bias_std: float = 0.0           # --pw-aug second value
    rotate: float = 0.0             # --rotate-aug: angle ~ U(-rotate, rotate) degrees
    brightness: float = 0.0         # --brightness-aug: offset ~ U(-b, b) (times the mean in raw space)
    contrast: float = 0.0           # --contrast-aug: factor ~ U(1-c, 1+c)
    gamma: float = 0.0              # --gamma-aug: gamma = exp(U(-log(1+g), log(1+g)))
    zoom_mode: str = "nearest"      # --zoom-interpolation: how the zoom crop is resized back
    transposes: bool = True         # --flips dihedral (True) or hv (False): the 8 or the 4 flips
    prob: float = 1.0               # --aug-prob: each of rescale, rotation, brightness/contrast, gamma
    rescale: float = 0.0            # --rescale-aug: resized by U(1-r, 1+r) and back
    rotate_border: str = "zeros"    # --rotate-border
    bc_space: str = "normalised"    # --brightness-contrast-space
    gamma_range: tuple[float, float] | None = None  # --gamma-range: gamma = 1 / U(lo, hi)

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"zoom scale must be in (0, 1], got {self.min_scale}")
        if self.scale_std < 0 or self.bias_std < 0:
            raise ValueError(f"augmentation std must be >= 0, got {self.scale_std}, {self.bias_std}")
        # written so that NaN fails too
        if not 0 <= self.rotate <= 180:
            raise ValueError(f"--rotate-aug: rotation must be in [0, 180] degrees, got {self.rotate}")
        if not 0 <= self.contrast < 1:
            raise ValueError(f"--contrast-aug: contrast must be in [0, 1) (factor in (0, 2)), got {self.contrast}")
        if not self.brightness >= 0:
            raise ValueError(f"--brightness-aug: brightness must be >= 0, got {self.brightness}")
        if not self.gamma >= 0:
            raise ValueError(f"--gamma-aug: gamma must be >= 0, got {self.gamma}")
        if self.zoom_mode not in ZOOM_MODES:
            raise ValueError(f"--zoom-interpolation: {self.zoom_mode!r} is not one of {', '.join(ZOOM_MODES)}")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"--aug-prob: a probability in [0, 1], got {self.prob}")
        if not 0 <= self.rescale < 1:
            raise ValueError(f"--rescale-aug: must be in [0, 1) (factor in (0, 2)), got {self.rescale}")
        if self.rotate_border not in ROTATE_BORDERS:
            raise ValueError(f"--rotate-border: {self.rotate_border!r} is not one of {', '.join(ROTATE_BORDERS)}")
        if self.bc_space not in BC_SPACES:
            raise ValueError(f"--brightness-contrast-space: {self.bc_space!r} is not one of {', '.join(BC_SPACES)}")
        if self.gamma_range is not None:
            lo, hi = self.gamma_range
            if not 0 < lo <= hi:
                raise ValueError(f"--gamma-range: need 0 < LO <= HI, got {lo},{hi}")
            if self.gamma > 0:
                raise ValueError("--gamma-range and --gamma-aug both draw the gamma: give one")

    @property
    def geometric(self) -> bool:
        return self.flips or self.min_scale < 1

    @property
    def jitter(self) -> bool:
        return self.scale_std > 0 or self.bias_std > 0

    @property
    def photometric(self) -> bool:
        """Rescale, rotation, gamma, brightness or contrast on (they share one set of draws)."""
        return (self.rotate > 0 or self.brightness > 0 or self.contrast > 0 or self.gamma > 0
                or self.gamma_range is not None or self.rescale > 0)


@dataclass(frozen=True)
class PseudoLabelSettings:
    first_epoch: int | None = None  # --pl-epoch; None: off
    size_func: SizeFunction = SizeFunction("x")
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
class ExecSettings:
    """Where and how this invocation executes, not what it computes: taken from this invocation,
    never from the checkpoint of --resume (the machine may have changed)."""
    device: str | None = None       # None: cuda if available; resolved: the device used ("cuda:0", "cpu")
    precision: str = AUTO           # resolved: fp16, bf16 or fp32 (what autocast uses)
    fp16: bool = True               # what `auto` precision means on CUDA
    channels_last: bool | str = AUTO
    compile: bool = False
    sync_bn: bool = False
    threads: int | None = None
    num_workers: int = 0
    image_cache: Path | None = None
    stats_cache: Path | None = None  # where computed pixel statistics are cached
    skip_bad_images: bool = False
    disp_batches: int = 50
    max_bad_steps: int = 50

    @property
    def autocast_dtype(self):
        """Autocast's torch dtype once `precision` is resolved; None: fp32, no autocast."""
        import torch  # here, not at the top: make_submission.py reads these settings and never needs torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[self.precision]


@dataclass(frozen=True)
class RunSettings:
    """What this invocation does and where its outputs go."""
    mode: str = "train"
    save: str | None = None
    load: str | None = None
    resume: str | None = None


@dataclass(frozen=True)
class Settings:
    data: DataSettings
    model: ModelSettings = ModelSettings()
    optim: OptimSettings = OptimSettings()
    augment: AugmentSettings = AugmentSettings()
    pseudo: PseudoLabelSettings = PseudoLabelSettings()
    inference: InferenceSettings = InferenceSettings()
    exec: ExecSettings = ExecSettings()
    run: RunSettings = RunSettings()
    seed: int | None = None  # the shuffled order, the augmentation and mixing draws; resolved: drawn once

    def replace(self, **groups) -> "Settings":
        """A copy with fields of groups replaced: `s.replace(model={"backbone": "x"}, seed=3)`."""
        changes = {name: dataclasses.replace(getattr(self, name), **value) if isinstance(value, dict) else value
                   for name, value in groups.items()}
        return dataclasses.replace(self, **changes)


# the submission's methods (make_submission.py offers them before it sets the BLAS thread count:
# this module imports neither numpy nor torch)
GROUP_METHODS = ("prob", "argmax", "mode")  # plate-group evidence: summed probabilities, arg-max counts, kNN mode
KNN_WEIGHTS = ("sigmoid", "relu-cos")       # a neighbour's vote: sigmoid(cos) (the 41st place's), max(cos, 0)
KNN_SEARCHES = ("group", "cell")            # where the K nearest are sought: in each plate group, in the cell type
KNN_COMBINES = ("mean", "concat")           # several embeddings files: mean then normalise, or normalise and concatenate
ASSIGN_SCORES = ("logsoftmax", "logits", "prob")  # what the per-plate assignment maximises


@dataclass(frozen=True)
class SubmissionSettings:
    """make_submission.py: which files, how they are combined and scored, where the CSV goes."""
    files: tuple[str, ...]
    output: str
    data: Path = Path("../data")
    weights: tuple[float, ...] | None = None  # None: equal
    group_method: str = "prob"
    assign_scores: str = "logsoftmax"
    knn: str | None = None  # K text: the files are embeddings files (the 41st place's kNN)
    use_valid: bool = False
    knn_search: str = "group"
    knn_weight: str = "sigmoid"
    knn_combine: str | None = None


# ----------------------------------------------------------------------- as plain values and back


def plain_value(v):
    """A setting as a plain JSON value: schedules as their text, paths as strings, tuples as lists."""
    if isinstance(v, (LRGroups, LRSchedule, SizeFunction)):
        return getattr(v, "text", None) or str(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [plain_value(x) for x in v]
    return v


def settings_dict(settings) -> dict:
    """Settings (or one group) as plain JSON values, one object per group."""
    def plain(v):
        is_group = dataclasses.is_dataclass(v) and not isinstance(v, tuple(_PARSERS))
        return settings_dict(v) if is_group else plain_value(v)

    return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


_PARSERS = {LRSchedule: LRSchedule.parse, LRGroups: LRGroups.parse, SizeFunction: SizeFunction, Path: Path}


def _typed(hint, value):
    """`value` (plain, as `plain_value` wrote it) as the type `hint` of its field."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds:  # e.g. bool | str: the value's own type when it is one of them
            if typing.get_origin(kind) is None and kind not in _PARSERS and isinstance(value, kind):
                return value
        return _typed(kinds[0], value)
    if origin is tuple:
        return tuple(_typed(args[0], v) for v in value)
    if hint in _PARSERS:
        return _PARSERS[hint](value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def group_from_dict(cls, values: dict):
    """One settings group from plain values; unknown keys are an error (ValueError naming them)."""
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    return cls(**{k: _typed(hints[k], v) for k, v in values.items()})


def settings_from_dict(values: dict) -> Settings:
    """`settings_dict`'s output back as Settings (a ValueError names what does not fit)."""
    hints = typing.get_type_hints(Settings)
    groups = {}
    for name, value in values.items():
        if name not in hints:
            raise ValueError(f"unknown settings group {name!r}")
        groups[name] = group_from_dict(hints[name], value) if dataclasses.is_dataclass(hints[name]) \
            else _typed(hints[name], value)
    return Settings(**groups)


def save_settings(path: str, settings: Settings) -> None:
    """Write `settings` as JSON, atomically (a crash leaves the previous file or none)."""
    with atomic_write(path, "w") as f:
        json.dump(settings_dict(settings), f, indent=1)
        f.write("\n")
