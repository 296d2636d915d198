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
from cellpaint.core.bounds import CPUS, MAX_WEIGHT, bounded, check_bounds, seed_bound
from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction, SizeSchedule

AUTO = "auto"
PRECISIONS = ("fp16", "bf16", "fp32")
BATCH_SAMPLINGS = ("random", "plate", "experiment")  # --batch-sampling
ADABN_DOMAINS = ("off", "plate", "experiment")        # --adabn
INFERENCE_WEIGHTS = ("auto", "ema", "raw")            # --inference-weights



def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """A setting named by a flag of fixed choices holds one of them, from any source (code, a checkpoint)."""
    if value not in choices:
        raise ValueError(f"{flag}: {value!r} is not one of {', '.join(choices)}")

@dataclass(frozen=True)
class DataSettings:
    """What data a run reads and how it is split, normalised and batched."""
    root: Path  # --data
    classes: int | None = bounded(None, "--classes", low=1, integer=True)
    use_layout_leak: bool = True
    folds: int = bounded(6, "--folds", low=1)
    cv_number: int = bounded(0, "--cv-number", low=-1)
    data_split_seed: int = seed_bound(0, "--data-split-seed")
    val_experiments: tuple[str, ...] | None = None
    val_last_experiment: bool = False
    all_controls_train: bool = True
    train_controls: bool = True
    finetune_cell_type: str | None = None
    normalization: str = "sample"
    batch_size: int = bounded(24, "--batch-size", low=1)
    # what one training batch is drawn from: the whole shuffled set (the original), or one plate or
    # one experiment (the 5th place's same-plate batches; engine/distributed.py GroupBatchSampler)
    batch_sampling: str = "random"
    # how train/val/test are made: "folds" (validation experiments dealt in folds: the competition
    # and release layouts) or an RxRx1-WILDS scheme ("official", "mixed-to-test"); auto: the layout's own
    split: str = AUTO

    def __post_init__(self) -> None:
        check_bounds(self)
        _check_choice("--batch-sampling", self.batch_sampling, BATCH_SAMPLINGS)


# the fields of ModelSettings that decide the network's shape: --load takes them from the checkpoint
ARCHITECTURE = ("backbone", "head_hidden", "concat_cell_type", "embedding_size", "bn_mom", "head")


@dataclass(frozen=True)
class ModelSettings:
    """The network, and how fresh weights start."""
    backbone: str = AUTO
    pretrained: str = "imagenet"
    embedding_size: int = bounded(1024, "--embedding-size", low=1)
    head_hidden: tuple[int, ...] | None = bounded(None, "--head-hidden", low=1, integer=True)
    concat_cell_type: bool | None = True  # None (from main.py's conversion): by the head
    bn_mom: float = bounded(0.05, "--bn-mom", 0, 1, low_open=True)
    stem_init: str = "random"
    head: str = "neck"
    bottleneck_bn: str = "recomputed"  # how DenseNet bottleneck BN statistics move (model.set_bottleneck_bn)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class OptimSettings:
    """The objective, the optimizer and the schedule of training."""
    epochs: int = bounded(90, "--epochs", low=1)
    lr: LRSchedule = LRSchedule.parse("cosine,1.5e-4")
    start_epoch: int = bounded(0, "--start-epoch", low=0)
    wd: float = bounded(1e-5, "--wd", low=0)
    backbone_lr_mult: float = bounded(1.0, "--backbone-lr-mult", low=0)
    lr_groups: LRGroups | None = None
    gradient_accumulation: int = bounded(1, "--gradient-accumulation", low=1)
    accumulation: str = "sum"
    loss: str = "ce"
    loss_classes: str = "all"
    # the ArcFace head's weight: 0 or 1 leaves a head without gradient; None (from main.py's conversion): by the head
    metric_loss_coeff: float | None = bounded(0.2, "--metric-loss-coeff", 0, 1)
    label_smoothing: float = bounded(0.0, "--label-smoothing", 0, 1, high_open=True)
    mixup: float = bounded(0.0, "--mixup", low=0)
    cutmix: float = bounded(0.0, "--cutmix", low=0)
    mix_partners: str = "shared"
    # an exponential moving average of the weights (timm's ModelEmaV3, with warm-up; None: off)
    model_ema: float | None = bounded(None, "--model-ema", 0, 1, low_open=True, high_open=True, integer=False)
    # progressive resizing: the training images' edge by epoch (None: the data's size throughout)
    image_size_schedule: SizeSchedule | None = None

    def __post_init__(self) -> None:
        check_bounds(self)


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
    # zoom crop edge drawn from [min_scale, 1]
    min_scale: float = bounded(1.0, "--scale-aug", 0, 1, low_open=True)
    scale_std: float = bounded(0.0, "--pw-aug", low=0)  # its first value
    bias_std: float = bounded(0.0, "--pw-aug", low=0)   # its second value
    rotate: float = bounded(0.0, "--rotate-aug", 0, 180)  # angle ~ U(-rotate, rotate) degrees
    # offset ~ U(-b, b) (times the mean in raw space)
    brightness: float = bounded(0.0, "--brightness-aug", low=0)
    contrast: float = bounded(0.0, "--contrast-aug", 0, 1, high_open=True)  # factor ~ U(1-c, 1+c)
    gamma: float = bounded(0.0, "--gamma-aug", low=0)  # gamma = exp(U(-log(1+g), log(1+g)))
    zoom_mode: str = "nearest"      # --zoom-interpolation: how the zoom crop is resized back
    transposes: bool = True         # --flips dihedral (True) or hv (False): the 8 or the 4 flips
    # each of rescale, rotation, brightness/contrast, gamma applied with this probability
    prob: float = bounded(1.0, "--aug-prob", 0, 1)
    rescale: float = bounded(0.0, "--rescale-aug", 0, 1, high_open=True)  # resized by U(1-r, 1+r) and back
    rotate_border: str = "zeros"    # --rotate-border
    bc_space: str = "normalised"    # --brightness-contrast-space
    # gamma = 1 / U(lo, hi)
    gamma_range: tuple[float, float] | None = bounded(None, "--gamma-range", low=0, low_open=True, integer=False)

    def __post_init__(self) -> None:
        check_bounds(self)
        _check_choice("--zoom-interpolation", self.zoom_mode, ZOOM_MODES)
        _check_choice("--rotate-border", self.rotate_border, ROTATE_BORDERS)
        _check_choice("--brightness-contrast-space", self.bc_space, BC_SPACES)
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
    first_epoch: int | None = bounded(None, "--pl-epoch", low=0, integer=True)  # None: off
    size_func: SizeFunction = SizeFunction("x")
    duplicates: str = "drop"

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class InferenceSettings:
    tta: int = bounded(1, "--tta", low=1)
    tta_size: float = bounded(1.0, "--tta-size", 0, 1, low_open=True)
    tta_random: int = bounded(0, "--tta-random", low=0)
    val_unit: str = "site"
    save_embeddings: bool = False
    pred_suffix: str = ""
    # BatchNorm statistics recomputed on each plate's (experiment's) sites before its logits (AdaBN)
    adabn: str = "off"
    # which weights infer: the EMA's when there are any (auto), the EMA's (ema) or the trained ones (raw)
    weights: str = "auto"

    def __post_init__(self) -> None:
        check_bounds(self)
        _check_choice("--adabn", self.adabn, ADABN_DOMAINS)
        _check_choice("--inference-weights", self.weights, INFERENCE_WEIGHTS)


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
    threads: int | None = bounded(None, "--threads", low=1, high=CPUS, integer=True)
    num_workers: int = bounded(0, "--num-data-workers", low=0)
    image_cache: Path | None = None
    stats_cache: Path | None = None  # where computed pixel statistics are cached
    skip_bad_images: bool = False
    disp_batches: int = bounded(50, "--disp-batches", low=1)
    max_bad_steps: int = bounded(50, "--max-bad-steps", low=1)

    def __post_init__(self) -> None:
        check_bounds(self)

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
    overwrite: bool = False  # a new run removes the earlier run's files at --save first
    normalise: str = "controls"     # --mode profiles: none, controls or tvn (cellpaint/data/profiles.py)
    evaluate: str = "none"          # --mode profiles: none, or map (copairs' replicate retrieval)


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
    # the shuffled order, the augmentation and mixing draws; resolved: drawn once
    seed: int | None = seed_bound(None, "--seed")

    def __post_init__(self) -> None:
        check_bounds(self)

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
BALANCES = ("sinkhorn", "columns")          # each plate's probabilities balanced before the assignment
KNN_CENTERS = ("plate",)                    # embeddings centred per plate before the kNN search


@dataclass(frozen=True)
class SubmissionSettings:
    """make_submission.py: which files, how they are combined and scored, where the CSV goes."""
    files: tuple[str, ...]
    output: str
    data: Path = Path("../data")
    weights: tuple[float, ...] | None = bounded(None, "-w/--weights", low=0, high=MAX_WEIGHT, integer=False)  # None: equal
    group_method: str = "prob"
    assign_scores: str = "logsoftmax"
    knn: str | None = None  # K text: the files are embeddings files (the 41st place's kNN)
    use_valid: bool = False
    knn_search: str = "group"
    knn_weight: str = "sigmoid"
    knn_combine: str | None = None
    balance: str | None = None  # one of BALANCES; None: the scores as they are (the 1st place)
    balance_iters: int = 0      # sinkhorn: the most rounds (columns, then rows)
    knn_center: str | None = None  # one of KNN_CENTERS; None: not centred (the 41st place)
    threads: int | None = bounded(None, "-t/--threads", low=1, high=CPUS, integer=True)  # numpy/BLAS threads

    def __post_init__(self) -> None:
        check_bounds(self)


# ----------------------------------------------------------------------- as plain values and back


def plain_value(v):
    """A setting as a plain JSON value: schedules as their text, paths as strings, tuples as lists."""
    if isinstance(v, (LRGroups, LRSchedule, SizeFunction, SizeSchedule)):
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


_PARSERS = {LRSchedule: LRSchedule.parse, LRGroups: LRGroups.parse, SizeFunction: SizeFunction,
            SizeSchedule: SizeSchedule.parse, Path: Path}


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


def save_settings(path: str, settings: Settings, run_id: str | None = None) -> None:
    """Write `settings` as JSON, atomically (a crash leaves the previous file or none); `run_id`
    first where given (SAVE.args.json: whose outputs these are, engine/run_owner.py)."""
    with atomic_write(path, "w") as f:
        json.dump({**({"run_id": run_id} if run_id else {}), **settings_dict(settings)}, f, indent=1)
        f.write("\n")
