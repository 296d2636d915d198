"""cellpaint-rcic: train, validate and predict siRNA classes on RxRx1 cell-painting images.

    python main.py --save results/dn161_0 [...]                 train (checkpoint per epoch, best, log)
    python main.py --mode val --load results/dn161_0            validation accuracy of a checkpoint
    python main.py --mode predict --tta 8 --load CKPT           prediction file CKPT.output<suffix>
    python main.py --mode eval --load CKPT --data WILDS_DIR     RxRx1-WILDS figures of it: CKPT.output<suffix>.wilds.json
    python main.py --mode profiles --load CKPT --evaluate map   well profiles CKPT.profiles<suffix>.parquet and their mAP

    torchrun --nproc_per_node N main.py ...                    any of these on N GPUs

Data flows one way: metadata table -> samples -> batches -> logits -> prediction file. This file
is the command line: it parses the arguments, converts them once into typed settings
(cellpaint/cli/flags.py; merged with the checkpoint of --resume or --load), checks them, makes the
run context (process group, device) and calls one mode: cellpaint/modes/train.py, validate.py,
predict.py or check.py. cellpaint/cli/entry.py turns a failure into one line and an exit status.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from cellpaint.cli import entry, flags, run_outputs
from cellpaint.cli.flag_types import (ArgsFileParser, args_file_line, bool_or_auto, bool_type, float_pair, int_list,
                                      lr_groups_type, lr_type, name_list, size_func_type, size_schedule_type)
from cellpaint.cli.runlog import set_log_handlers, setup_logging
from cellpaint.core.bounds import BoundError
from cellpaint.core.errors import InputError, Interrupted, UsageError
from cellpaint.core.schedule import LRSchedule, SizeFunction
from cellpaint.core.settings import (ADABN_DOMAINS, AUTO, BATCH_SAMPLINGS, BC_SPACES, FLIP_SETS, INFERENCE_WEIGHTS,
                                     PRECISIONS, ROTATE_BORDERS, ZOOM_MODES, Settings, settings_dict,
                                     settings_from_dict)
from cellpaint.data.pixel_stats import NORMALIZATIONS
from cellpaint.data.profiles import EVALUATIONS as PROFILE_EVALUATIONS, NORMALISATIONS as PROFILE_NORMALISATIONS
from cellpaint.data.wilds import SCHEMES as WILDS_SCHEMES
from cellpaint.engine import distributed, mixing, run_owner
from cellpaint.engine.checkpoints import LEGACY_FORMATS, load_checkpoint
from cellpaint.engine.context import RunContext
from cellpaint.modes import check, pseudo_labels, wilds_eval
from cellpaint.modes.predict import predict
from cellpaint.modes.profiles import profiles
from cellpaint.modes.train import train
from cellpaint.modes.validate import validate
from cellpaint.networks.backbones import STEM_INITS
from model import BOTTLENECK_BN, HEADS, LOSSES

log = logging.getLogger("cellpaint")


# ------------------------------------------------------------------------------------- arguments
# value types of the flags: cellpaint/cli/flag_types.py


def build_parser() -> argparse.ArgumentParser:
    p = ArgsFileParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       fromfile_prefix_chars="@")  # recipes/*.args: one argument per line
    p.convert_arg_line_to_args = args_file_line
    p.add_argument("-m", "--mode", default="train", choices=("train", "val", "predict", "check", "eval", "profiles"),
                   help="eval: score the prediction file of --load as RxRx1-WILDS does (CKPT.output<suffix>.wilds.json); "
                        "profiles: every well's embedding, normalised, as CKPT.profiles<suffix>.parquet")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=AUTO,
                   help="auto (densenet161, or mem-densenet161 when GPU memory is short; logged), torchvision "
                        "resnet*/densenet*/efficientnet* ('mem-' prefix: memory-efficient DenseNet), "
                        "'pm-NAME' for a pretrainedmodels model, 'timm-NAME' for any timm model")
    g.add_argument("--pretrained", default="imagenet", help="imagenet | none | PATH to a state dict")
    g.add_argument("--head-hidden", type=int_list, default=None, help="hidden layer sizes of the softmax head")
    g.add_argument("--head", choices=HEADS, default="neck",
                   help="neck: BN/Linear/ReLU/BN/Linear/BN embedding + softmax and ArcFace heads (the 1st place); "
                        "plain: ReLU, pool, Linear(F, E) (the embedding), BN, ReLU, Linear(E, classes) (the 41st)")
    g.add_argument("--concat-cell-type", type=bool_type, default=None, help="default: true with --head neck")
    g.add_argument("--metric-loss-coeff", type=float, default=None,
                   help="weight c of the ArcFace loss (default: 0.2 with --head neck, 0 with plain)")
    g.add_argument("--loss", choices=LOSSES, default="ce",
                   help="ce: softmax cross-entropy on dense targets; bce: BCE with logits on them (the 41st place)")
    g.add_argument("--loss-classes", choices=("all", "treatment"), default="all",
                   help="classes the loss is taken over; treatment (the 41st place's outputs) needs "
                        "--train-controls false")
    g.add_argument("--embedding-size", type=int, default=1024)
    g.add_argument("--bn-mom", type=float, default=0.05, help="momentum of every BatchNorm's running statistics")
    g.add_argument("--bottleneck-bn", choices=BOTTLENECK_BN, default="recomputed",
                   help="DenseNets: each dense layer's bottleneck BN moves as in the 1st place's memory-efficient "
                        "DenseNet161, which recomputed it and so updated it twice a step (recomputed: momentum "
                        "1-(1-m)^2 on the plain net), or once a step at --bn-mom (once), whichever the variant")
    g.add_argument("--classes", type=int, default=None, help="output classes (default: from the metadata)")
    g.add_argument("--stem-init", choices=STEM_INITS, default="random",
                   help="the 6-channel input conv when ImageNet weights load: random (a fresh conv, as the "
                        "1st place), rgb-copy (channel i starts from RGB kernel i mod 3, scaled by 3/6) or "
                        "rgb-tile (the same unscaled, as the 41st place)")
    g = p.add_argument_group("training")
    g.add_argument("-e", "--epochs", type=int, default=90)
    g.add_argument("-b", "--batch_size", "--batch-size", dest="batch_size", type=int, default=24)
    g.add_argument("--gradient-accumulation", type=int, default=2)
    g.add_argument("--accumulation-mode", dest="accumulation", choices=("sum", "mean"),
                   default="sum", help="sum: each batch's gradient at full weight, a trailing partial group "
                                       "dropped (the 1st place); mean: the loss divided by the group size, "
                                       "the trailing group stepped too")
    g.add_argument("-l", "--lr", type=lr_type, default=LRSchedule.parse("cosine,1.5e-4"),
                   help="schedule,v1,e1,v2,e2,...,vn with schedule cosine or const")
    g.add_argument("--backbone-lr-mult", type=float, default=1.0,
                   help="the backbone's learning rate as a multiple of --lr (layer-wise learning rates)")
    g.add_argument("--lr-groups", type=lr_groups_type, default=None, metavar="P,Q=M,...",
                   help="backbone parameters whose names start with P or Q at M times --lr (M may be a "
                        "fraction p/q); the rest of the backbone at --backbone-lr-mult")
    g.add_argument("--finetune-cell-type", default=None,
                   help="train/validate/predict one cell type only (with --load of a general model)")
    g.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=1e-5)
    g.add_argument("--label-smoothing", "--ls", dest="label_smoothing", type=float, default=0.0)
    g.add_argument("--mixup", type=float, default=0.0, help="Beta alpha of mixup (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="Beta alpha of cutmix (0: off)")
    g.add_argument("--mix-partners", choices=mixing.PARTNER_RULES, default="shared",
                   help="with mixup and cutmix both on: one partner permutation for both (shared, the 1st "
                        "place) or one each (separate)")
    g.add_argument("--model-ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (timm's ModelEmaV3) after every "
                        "optimizer step t, at decay min(DECAY, 1 - t^(-2/3)) (warm-up; the first step copies), "
                        "e.g. 0.999; validation and pseudo-labelling use it, checkpoints keep it beside the "
                        "weights and --mode val/predict use it by default (see --inference-weights); default off")
    g.add_argument("--image-size-schedule", type=size_schedule_type, default=None, metavar="SIZE:EPOCH,...",
                   help="progressive resizing: training images resized on the device to edge SIZE from epoch "
                        "EPOCH on, e.g. 224:0,384:30,512:60 (sizes and epochs rising, the first at epoch 0, "
                        "none above the data's size); validation and prediction at the data's size; default off")
    g.add_argument("--pw-aug", type=float_pair, default=(0.1, 0.1), help="per-channel scale std,bias std")
    g.add_argument("--scale-aug", type=float, default=0.5, help="zoom crop edge drawn from [scale, 1]")
    g.add_argument("--zoom-interpolation", choices=ZOOM_MODES, default="nearest",
                   help="how the zoom crop is resized back: nearest (pixels copied, the 1st place) or "
                        "bilinear (antialiased, smoother)")
    g.add_argument("--rotate-aug", type=float, default=0.0, metavar="DEG",
                   help="random rotation by U(-DEG, DEG) degrees, zero fill (0: off)")
    g.add_argument("--brightness-aug", type=float, default=0.0, metavar="B",
                   help="offset U(-B, B) added to the normalised image (0: off)")
    g.add_argument("--contrast-aug", type=float, default=0.0, metavar="C",
                   help="normalised image times U(1-C, 1+C), C in [0, 1) (0: off)")
    g.add_argument("--gamma-aug", type=float, default=0.0, metavar="G",
                   help="gamma exp(U(-log(1+G), log(1+G))) on raw intensities (0: off)")
    g.add_argument("--flips", choices=FLIP_SETS, default="dihedral",
                   help="dihedral: the 8 flips/transposes (the 1st place); hv: horizontal and vertical flips, "
                        "a fair coin each (the 41st); none")
    g.add_argument("--aug-prob", type=float, default=1.0, metavar="P",
                   help="apply each of rescale, rotation, brightness/contrast (together) and gamma with "
                        "probability P (the 41st place: 0.5)")
    g.add_argument("--rescale-aug", type=float, default=0.0, metavar="R",
                   help="resize by U(1-R, 1+R) (bilinear) and back (bicubic): resolution jitter, no zoom (0: off)")
    g.add_argument("--rotate-border", choices=ROTATE_BORDERS, default="zeros",
                   help="what fills the corners of --rotate-aug: zeros, or the image mirrored at its edges "
                        "(reflect-101: about the edge pixels, the 41st place's cv2 default)")
    g.add_argument("--brightness-contrast-space", choices=BC_SPACES, default="normalised",
                   help="normalised: x*a + b after normalisation; raw: clip(x*a + b*mean(x), 0, 255) on raw "
                        "intensities before gamma (the 41st place; needs a fixed --data-normalization)")
    g.add_argument("--gamma-range", type=float_pair, default=None, metavar="LO,HI",
                   help="gamma 255*(x/255)^(1/g), g ~ U(LO, HI) (the 41st place: 0.8,1.2); instead of --gamma-aug")
    g.add_argument("--fp16", type=bool_type, default=True, help="mixed precision on the GPU (see --precision)")
    g.add_argument("--precision", choices=(AUTO, *PRECISIONS), default=AUTO,
                   help="auto: fp16 on CUDA when --fp16, else fp32")
    g.add_argument("--seed", type=int, default=None, help="global seed (random and logged if not given)")
    g.add_argument("--start-epoch", type=int, default=0, help="first epoch when fine-tuning from --load")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue a run from exactly where it stopped, with its saved settings; "
                        "only these flags may differ from the checkpoint's: " + ", ".join(flags.may_change_flags()))
    g.add_argument("--max-bad-steps", type=int, default=50,
                   help="stop when the loss is not finite for this many steps in a row")
    g.add_argument("--disp-batches", type=int, default=50, help="log statistics every N batches")
    g = p.add_argument_group("pseudo-labelling")
    g.add_argument("--pl-epoch", type=int, default=None, help="first epoch of pseudo-labelling (default: off)")
    g.add_argument("--pl-size-func", type=size_func_type, default=SizeFunction("x"),
                   help="fraction of val+test wells labelled by then, as a function of "
                        "x = (epoch - pl_epoch + 1) / (epochs - pl_epoch + 1)")
    g.add_argument("--pl-duplicates", choices=pseudo_labels.DUPLICATE_RULES, default="drop",
                   help="a chosen well whose class a more confident well of its plate got this epoch: dropped "
                        "(fewer wells added, the 1st place) or replaced by the next-ranked well (refill)")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=Path("../data"))
    g.add_argument("--cv-number", type=int, default=0, help="validation fold, -1: train on everything")
    g.add_argument("--folds", type=int, default=6)
    g.add_argument("--val-unit", choices=("site", "well"), default="site",
                   help="validation accuracy (and the best checkpoint) over sites, each alone (the 1st place), "
                        "or over wells with their sites' logits summed (as the submission predicts)")
    g.add_argument("--val-experiments", type=name_list, default=None, metavar="A,B,...",
                   help="validate on these train experiments (by name) instead of fold --cv-number")
    g.add_argument("--val-last-experiment", action="store_true",
                   help="validate on the last train experiment (in name order) of each cell type (the 41st place)")
    g.add_argument("--batch-sampling", choices=BATCH_SAMPLINGS, default="random",
                   help="random: batches from the whole shuffled training set (the 1st place); plate or "
                        "experiment: every training batch (every global batch under torchrun) from one plate or "
                        "one experiment, in a seeded order (the 5th place); needs --concat-cell-type false")
    g.add_argument("--split", choices=(AUTO, "folds", *WILDS_SCHEMES), default=AUTO,
                   help="auto: the layout's own; folds: validation experiments dealt in folds (--cv-number: the "
                        "competition and release layouts); official or mixed-to-test: the RxRx1-WILDS splits (the "
                        "wilds layout, official by default)")
    g.add_argument("--data-split-seed", type=int, default=0)
    g.add_argument("--data-normalization", choices=NORMALIZATIONS, default="sample")
    g.add_argument("--all-controls-train", type=bool_type, default=True,
                   help="train on the control wells of validation and test experiments too")
    g.add_argument("--train-controls", type=bool_type, default=True,
                   help="train on control wells (false: treatment wells only, as the 41st place)")
    g.add_argument("--use-layout-leak", type=bool_type, default=True,
                   help="label test experiments whose plate layout repeats a train experiment's")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where computed pixel statistics are cached (--data-normalization other than sample); "
                        "default: the folder 'cache' beside --save (or --load)")
    g.add_argument("--num-data-workers", type=int, default=min(8, os.cpu_count() or 1))
    g.add_argument("--image-cache", type=Path, default=None,
                   help="decoded-image cache built by prepare.py, read instead of the PNGs")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave out sites whose PNGs are missing or corrupt (a warning each, a count per pass) "
                        "instead of stopping with an error naming the file; in prediction a well with no "
                        "readable site gets an all-zero vector")
    g = p.add_argument_group("prediction and output")
    g.add_argument("--save", default=None, help="checkpoint path: <save>.<epoch> each epoch, <save> the best; "
                                                "refused when it holds another run's files (see --overwrite)")
    g.add_argument("--overwrite", action="store_true",
                   help="training: remove the files of the earlier run at --save first (its checkpoints, log, "
                        "metrics, curves, settings and the prediction files made from its checkpoints)")
    g.add_argument("--load", default=None, help="checkpoint (or bare weights) for val, predict or fine-tuning")
    g.add_argument("--tta", type=int, default=1, help="test-time views: flips/transposes, then shifted crops")
    g.add_argument("--tta-size", type=float, default=1.0, help="crop fraction of the TTA views")
    g.add_argument("--tta-random", type=int, default=0, metavar="N",
                   help="instead of --tta: average N passes of the training augmentation (the 41st place: 10)")
    g.add_argument("--adabn", choices=ADABN_DOMAINS, default="off",
                   help="at validation, pseudo-labelling and prediction, recompute the backbone's BatchNorm "
                        "statistics on all sites of each plate (experiment) before its logits are taken "
                        "(AdaBN, the 5th place); the weights are untouched; default off")
    g.add_argument("--inference-weights", choices=INFERENCE_WEIGHTS, default="auto",
                   help="which weights validation, pseudo-labelling and prediction use: auto (the EMA weights "
                        "when the run or checkpoint has them, see --model-ema), ema, or raw (the trained ones)")
    g.add_argument("--pred-suffix", default="", help="prediction file is <load>.output<suffix>")
    g.add_argument("--save-embeddings", action="store_true", help="also write <load>.embeddings<suffix>")
    g.add_argument("--normalise", choices=PROFILE_NORMALISATIONS, default="controls",
                   help="--mode profiles: none; controls (each plate centred on its negative controls, features scaled "
                        "by their spread); tvn (whitened on the negative controls)")
    g.add_argument("--evaluate", choices=PROFILE_EVALUATIONS, default="none",
                   help="--mode profiles: map prints copairs' mAP of retrieving each siRNA's wells in other "
                        "experiments against negative controls, and the fraction of siRNAs with significant mAP")
    g.add_argument("--channels-last", type=bool_or_auto, default=AUTO,
                   help="channels-last memory format; auto: on with mixed precision on CUDA (measured faster), "
                        "off otherwise")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true",
                   help="with torchrun on GPUs: batch-norm statistics over all processes (SyncBatchNorm)")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy CPU)")
    return p


def saved_settings(state: dict, path: str) -> Settings | None:
    """The settings a checkpoint was made with (None for a bare weights file). A checkpoint of the
    first format recorded the parsed arguments instead: they are read back through this parser."""
    try:
        if "settings" in state:
            return settings_from_dict(state["settings"])
        if state.get("format") in LEGACY_FORMATS:
            return legacy_settings(state.get("args") or {})
    except BoundError:
        raise
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise InputError(f"{path}: its settings do not read back ({e})") from None
    return None


def legacy_settings(saved: dict) -> Settings:
    """Settings from the plain arguments a `cellpaint-rcic/1` checkpoint recorded: the parser's
    defaults, with each saved value converted by its flag's type."""
    p = build_parser()
    args = p.parse_args([])
    types = {a.dest: a.type for a in p._actions}  # the command line's own parser: its internals are ours
    for dest, value in saved.items():
        if dest not in vars(args):
            continue  # a flag removed since the checkpoint was made
        kind = types.get(dest)
        if isinstance(value, str) and callable(kind) and kind is not str:
            value = kind(value)
        setattr(args, dest, value)
    if "bottleneck_bn" not in saved:  # made before the option: continue with the statistics it trained with
        args.bottleneck_bn = "recomputed" if str(args.backbone).startswith("mem-") else "once"
    return flags.complete(flags.settings_from_args(args))


@dataclass(frozen=True)
class Command:
    """What one invocation of main.py does: its settings, and the checkpoint read for them."""
    settings: Settings
    checkpoint: dict | None = None
    debug: bool = False


def parse_command_line(argv: list[str] | None = None) -> Command:
    """The command line as settings, with what a checkpoint carries: `--resume` continues the run's
    saved settings and `--load` takes its architecture (cli/flags.py). Flags that cannot work
    are argparse errors (exit 2); a missing or unreadable checkpoint, a flag that contradicts
    it, are errors for main() to report in one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    args = p.parse_args(argv)
    if args.mode == "train" and not (args.save or args.resume):
        p.error("training needs --save PATH (or --resume CKPT)")
    if args.mode in ("val", "predict", "eval", "profiles") and not args.load:
        p.error(f"--mode {args.mode} needs --load CKPT")
    if args.overwrite and flags.overwrite_problem(args.mode, args.resume):  # before any checkpoint is read
        p.error(flags.overwrite_problem(args.mode, args.resume))
    try:
        s = flags.settings_from_args(args)
    except ValueError as e:  # a value outside its domain (core/bounds.py), or values that exclude each other
        aliases = {a.dest: a.option_strings for a in p._actions}  # the command line's own parser
        p.error(f"{e} ({flags.origin(getattr(e, 'flag', None), argv, aliases)})")
    typed = flags.typed_flags(build_parser, argv)
    state = None
    checkpoint = args.resume if args.resume and args.mode == "train" else args.load
    if checkpoint:
        state = load_checkpoint(checkpoint)
        try:
            saved = saved_settings(state, checkpoint)
        except BoundError as e:
            p.error(f"{e} (from the checkpoint {checkpoint}, not typed here)")
    if args.resume and args.mode == "train":
        if "optimizer" not in state or saved is None:
            raise InputError(f"--resume {args.resume}: a bare weights file cannot resume a run (use --load)")
        s = flags.resume(s, saved, typed, args.resume)
    elif args.load and saved is not None:
        s = flags.take_architecture(s, saved, typed, args.load)
    if args.mode == "train":
        if s.run.save:
            check_save(s.run.save)
        if args.resume:  # the run's own prefix (engine/run_owner.py), or --save when given
            done = int(state.get("epoch", -1)) + 1
            if done >= s.optim.epochs:
                raise UsageError(f"--resume {args.resume}: its run already did all its {s.optim.epochs} epochs; to "
                                 f"train on, start a new run from it: --load {args.resume} --start-epoch {done} "
                                 f"-e MORE --save NEW_PREFIX")
            s = s.replace(run={"save": run_owner.resume_prefix(args.resume, state, s.run.save)})
            check_save(s.run.save)
    s = flags.complete(s)
    problem = flags.problems(s)
    if problem:
        p.error(problem)
    return Command(s, state, args.debug)


def check_save(save: str) -> None:
    if save.endswith(os.sep) or Path(save).is_dir():
        # outputs are <save>.<epoch>, <save>.log, ...: a directory would hide them as DIR/.0 or fail to hold <save>
        raise UsageError(f"--save {save} names a directory; give a path prefix in it, "
                         f"e.g. --save {os.path.join(save, 'net')}")


def parse_settings(argv: list[str]) -> Settings:
    """The settings of a command line (what main() would run with)."""
    return parse_command_line(argv).settings


# ---------------------------------------------------------------------------- logging and main


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """--threads for the body; torch's own count comes back after it (runs in one process, demo.py
    and the tests, stay independent)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(argv: list[str] | None) -> int:
    """Parse, then run one mode (the body of main)."""
    command = parse_command_line(argv)
    s = command.settings
    if s.run.mode == "check":
        return check.report(check.check_data(s.data.root, s.data.classes, workers=s.exec.num_workers))
    if s.run.mode == "eval":  # numbers from a prediction file: no network, no device
        wilds_eval.evaluate_file(s, command.checkpoint)
        return 0
    with torch_threads(s.exec.threads):
        # under torchrun each process takes its own GPU (cuda:LOCAL_RANK)
        world, device = distributed.init(torch.device(s.exec.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        try:
            run_mode(s, RunContext(world, device), command.checkpoint)
        finally:
            distributed.shutdown()
    return 0


def run_mode(s: Settings, ctx: RunContext, checkpoint: dict | None) -> None:
    """The mode of `s`, holding its output and logging to its file."""
    mode, save, load = s.run.mode, s.run.save, s.run.load
    output = f"{load}.output{s.inference.pred_suffix}"
    # a resumed run keeps its id; a new one (a fine-tuning of --load too) gets its own
    run_id = (run_owner.run_id_of(checkpoint) if s.run.resume else "") or run_owner.new_run_id()
    with contextlib.ExitStack() as stack:
        note = run_outputs.hold(s, stack, checkpoint, run_id) if ctx.world.main and mode in ("train", "predict") else None
        # each prediction file its own log: several --pred-suffix runs of one checkpoint must not share one
        log_path = {"train": f"{save}.log", "predict": f"{output}.log"}.get(mode)
        staged_log = setup_logging(log_path, ctx.world, staged=mode == "predict", append=bool(s.run.resume),
                                   arguments=settings_dict(s))
        if note:
            log.warning("%s", note)
        if mode == "train":
            train(s, ctx, resume=checkpoint if s.run.resume else None,
                  init=None if s.run.resume else checkpoint, run_id=run_id)
        else:
            try:
                {"val": validate, "predict": predict, "profiles": profiles}[mode](s, ctx, checkpoint)
            except KeyboardInterrupt as e:
                raise Interrupted(f"interrupted: --mode {mode} wrote nothing; run the same command again", e) from None
        if staged_log:
            set_log_handlers([logging.StreamHandler(sys.stderr)])  # closes the file before it is renamed
            os.replace(*staged_log)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    set_log_handlers([logging.StreamHandler(sys.stderr)])  # not a previous run's log file (demo, tests)
    report = lambda line: log.error("%s", line)  # noqa: E731 - to stderr, and to the run's log once it has one
    return entry.run(lambda: run(argv), report=report, report_interruption=report, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
