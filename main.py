#!/usr/bin/env python3
"""cellpaint-rcic: train, validate and predict siRNA classes on RxRx1 cell-painting images.

    python main.py --save results/dn161_0 [...]                 train (checkpoint per epoch, best, log)
    python main.py --mode val --load results/dn161_0            validation accuracy of a checkpoint
    python main.py --mode predict --tta 8 --load CKPT           prediction file CKPT.output<suffix>

    torchrun --nproc_per_node N main.py ...                    any of these on N GPUs

Data flows one way: metadata table -> samples -> batches -> logits -> prediction file. This file
is the command line: it parses and checks the arguments, converts them once into typed settings
(cellpaint/core/settings.py) and a run context (process group, device), and dispatches to
the modes: cellpaint/modes/train.py (train, val) and cellpaint/modes/predict.py (predict),
built from cellpaint/engine/setup.py.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from pathlib import Path

import torch

import dataset
from cellpaint.core import errors
from cellpaint.data import metadata
from cellpaint.modes import check
from cellpaint.data.augment import BC_SPACES, FLIP_SETS, ROTATE_BORDERS
from cellpaint.cli.flag_types import (args_file_line, bool_or_auto, bool_type, float_pair, int_list, lr_groups_type,
                                  lr_type, name_list, size_func_type)
from cellpaint.modes.predict import predict
from cellpaint.cli import resume as runconfig
from cellpaint.modes import pseudo_labels
from cellpaint.engine import mixing
from cellpaint.engine import autoselect
from cellpaint.engine import distributed
from cellpaint.core import runlock
from cellpaint.engine.checkpoints import checkpoint_args, load_checkpoint
from cellpaint.engine.setup import amp_dtype, precision_name
from cellpaint.modes.train import train, validate
from cellpaint.cli.runlog import set_log_handlers, setup_logging
from cellpaint.core.schedule import LRSchedule, SizeFunction
from cellpaint.core.settings import RunContext, augment_from_args, settings_from_args
from model import HEADS, LOSSES, STEM_INITS, is_supported_backbone, supported_backbones

log = logging.getLogger("cellpaint")


# ------------------------------------------------------------------------------------- arguments
# value types of the flags: cellpaint/cli/flag_types.py


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                fromfile_prefix_chars="@")  # recipes/*.args: one argument per line
    p.convert_arg_line_to_args = args_file_line
    p.add_argument("-m", "--mode", default="train", choices=("train", "val", "predict", "check"))
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=autoselect.AUTO,
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
    g.add_argument("--bn-mom", type=float, default=0.05)
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
    g.add_argument("--pw-aug", type=float_pair, default=(0.1, 0.1), help="per-channel scale std,bias std")
    g.add_argument("--scale-aug", type=float, default=0.5, help="zoom crop edge drawn from [scale, 1]")
    g.add_argument("--zoom-interpolation", choices=dataset.ZOOM_MODES, default="nearest",
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
    g.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="auto: fp16 on CUDA when --fp16, else fp32")
    g.add_argument("--seed", type=int, default=None, help="global seed (random and logged if not given)")
    g.add_argument("--start-epoch", type=int, default=0, help="first epoch when fine-tuning from --load")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue a run from exactly where it stopped, with its saved settings; "
                        "only these flags may differ from the checkpoint's: "
                        + ", ".join(map(runconfig.flag_name, runconfig.MAY_CHANGE)))
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
    g.add_argument("--data-split-seed", type=int, default=0)
    g.add_argument("--data-normalization", choices=dataset.NORMALIZATIONS, default="sample")
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
    g.add_argument("--save", default=None, help="checkpoint path: <save>.<epoch> each epoch, <save> the best")
    g.add_argument("--load", default=None, help="checkpoint (or bare weights) for val, predict or fine-tuning")
    g.add_argument("--tta", type=int, default=1, help="test-time views: flips/transposes, then shifted crops")
    g.add_argument("--tta-size", type=float, default=1.0, help="crop fraction of the TTA views")
    g.add_argument("--tta-random", type=int, default=0, metavar="N",
                   help="instead of --tta: average N passes of the training augmentation (the 41st place: 10)")
    g.add_argument("--pred-suffix", default="", help="prediction file is <load>.output<suffix>")
    g.add_argument("--save-embeddings", action="store_true", help="also write <load>.embeddings<suffix>")
    g.add_argument("--channels-last", type=bool_or_auto, default=autoselect.AUTO,
                   help="channels-last memory format; auto: on with mixed precision on CUDA (measured faster), "
                        "off otherwise")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true",
                   help="with torchrun on GPUs: batch-norm statistics over all processes (SyncBatchNorm)")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy CPU)")
    return p


def check_recipe_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the head-dependent defaults and refuse flags that contradict each other (one line each)."""
    if args.head == "plain":
        given = [flag for flag, on in (("--concat-cell-type true", args.concat_cell_type),
                                       ("--metric-loss-coeff > 0", (args.metric_loss_coeff or 0) > 0),
                                       ("--head-hidden", args.head_hidden)) if on]
        if given:
            p.error(f"--head plain has no cell-type one-hot, ArcFace head or hidden layers: drop {', '.join(given)}")
    plain = args.head == "plain"
    args.concat_cell_type = not plain if args.concat_cell_type is None else args.concat_cell_type
    args.metric_loss_coeff = (0.0 if plain else 0.2) if args.metric_loss_coeff is None else args.metric_loss_coeff
    if args.loss_classes == "treatment" and args.train_controls:
        p.error("--loss-classes treatment leaves the control classes out of the loss: add --train-controls false")
    if args.val_last_experiment and (args.val_experiments or args.cv_number == -1):
        p.error("--val-last-experiment chooses the validation experiments: drop --val-experiments / --cv-number -1")
    if args.tta_random < 0 or (args.tta_random and args.tta > 1):
        p.error("--tta-random N (N >= 0) replaces --tta: give one of them")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed and checked command line (plain values only); see parse_command_line."""
    return parse_command_line(argv)[0]


def parse_command_line(argv: list[str] | None = None) -> tuple[argparse.Namespace, RunContext]:
    """The command line, with what a checkpoint carries: `--resume` restores the run's saved
    settings and `--load` its architecture (runconfig.py); the checkpoint read for that comes back
    in the run context. A DataError (a missing or unreadable checkpoint, a flag that contradicts
    it) is main()'s to report in one line."""
    p = build_parser()
    args = p.parse_args(argv)
    given = runconfig.given_dests(build_parser(), argv)
    ctx = RunContext()
    if args.mode == "train" and not (args.save or args.resume):
        p.error("training needs --save PATH (or --resume CKPT)")
    if args.mode in ("val", "predict") and not args.load:
        p.error(f"--mode {args.mode} needs --load CKPT")
    if args.resume and args.mode == "train":
        ctx.resume_state = load_checkpoint(args.resume)
        if "optimizer" not in ctx.resume_state:
            raise metadata.DataError(f"--resume {args.resume}: a bare weights file cannot resume a run (use --load)")
        runconfig.restore_run(p, args, ctx.resume_state, args.resume, given)
    elif args.load:
        ctx.load_state = load_checkpoint(args.load)
        runconfig.take_architecture(p, args, ctx.load_state, args.load, given)
    if args.resume and not args.save:
        args.save = re.sub(r"\.\d+$", "", args.resume)
    if args.mode == "train" and (args.save.endswith(os.sep) or Path(args.save).is_dir()):
        # outputs are <save>.<epoch>, <save>.log, ...: a directory would hide them as DIR/.0 or fail to hold <save>
        raise runconfig.FlagError(f"--save {args.save} names a directory; give a path prefix in it, "
                                  f"e.g. --save {os.path.join(args.save, 'net')}")
    if args.num_data_workers < 0 or (args.threads is not None and args.threads < 1):
        p.error(f"--num-data-workers must be >= 0 and --threads >= 1, got {args.num_data_workers} and {args.threads}")
    for name in ("epochs", "batch_size", "gradient_accumulation", "folds", "disp_batches", "tta", "max_bad_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.val_experiments and args.cv_number == -1:
        p.error("--val-experiments names validation experiments; --cv-number -1 trains on all of them")
    check_recipe_flags(p, args)
    if not -1 <= args.cv_number < args.folds:
        p.error(f"--cv-number must be -1 or in [0, {args.folds}), got {args.cv_number}")
    if args.pl_epoch is not None and not 0 <= args.pl_epoch < args.epochs:
        p.error(f"--pl-epoch must be in [0, {args.epochs}), got {args.pl_epoch}")
    if args.backbone_lr_mult < 0:
        p.error(f"--backbone-lr-mult must be >= 0, got {args.backbone_lr_mult}")
    if not 0 <= args.metric_loss_coeff <= 1 or not 0 <= args.label_smoothing < 1:
        p.error("--metric-loss-coeff must be in [0, 1] and --label-smoothing in [0, 1)")
    try:
        augment_from_args(args)
        dataset.tta_views(torch.zeros(1, 1, 8, 8), args.tta, args.tta_size)
    except ValueError as e:
        p.error(str(e))
    if args.backbone != autoselect.AUTO and not is_supported_backbone(args.backbone):
        p.error(f"--backbone {args.backbone!r} is not supported; choose from: auto, {', '.join(supported_backbones())}, "
                f"or timm-NAME for any NAME of timm.list_models()")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little") % 10 ** 9
    return args, ctx


# ---------------------------------------------------------------------------- logging and main


def main(argv: list[str] | None = None) -> int:
    try:
        args, ctx = parse_command_line(argv)
    except errors.CellpaintError as e:  # the checkpoint of --resume/--load: missing, unreadable, or contradicted
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        set_log_handlers([logging.StreamHandler(sys.stderr)])  # not a previous run's log file (demo, tests)
        log.error("%s", errors.one_line(e))
        return errors.exit_status(e)  # 2 for a FlagError (a UsageError), else 1
    if args.mode == "check":
        return check.report(check.check_data(args.data, args.classes, workers=args.num_data_workers))
    threads = torch.get_num_threads()  # restored at the end: runs in one process (demo, tests) stay independent
    if args.threads:
        torch.set_num_threads(args.threads)
    # under torchrun each process takes its own GPU (cuda:LOCAL_RANK)
    try:
        ctx.world, device = distributed.init(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    except distributed.LaunchError as e:
        if args.debug:
            raise
        set_log_handlers([logging.StreamHandler(sys.stderr)])  # logged like every other error
        log.error("%s", errors.one_line(e))
        return errors.exit_status(e)  # 2: a UsageError
    args.device = str(device)  # resolved values are recorded as such (the log, checkpoints)
    ctx.device, ctx.dtype = device, amp_dtype(args.precision, args.fp16, device)
    auto_channels_last = args.channels_last == autoselect.AUTO
    if auto_channels_last:
        precision = precision_name(ctx.dtype)
        args.channels_last = autoselect.choose_channels_last(device.type, precision)
    # the one conversion: the modes get typed settings; the namespace stays here, for the run's lock,
    # log file and messages, and (as plain values) in the checkpoints
    settings = settings_from_args(args)
    try:
        with contextlib.ExitStack() as stack:
            if ctx.world.main and args.mode in ("train", "predict"):
                # one run per output: a second would interleave the log and overwrite checkpoints
                target = (args.save, f"--save {args.save}") if args.mode == "train" else \
                    (f"{args.load}.output{args.pred_suffix}", f"the prediction file {args.load}.output{args.pred_suffix}")
                Path(target[0]).parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(runlock.hold(f"{target[0]}.lock", target[1]))
            # each prediction file its own log: several --pred-suffix runs of one checkpoint must not share one
            log_path = {"train": f"{args.save}.log",
                        "predict": f"{args.load}.output{args.pred_suffix}.log"}.get(args.mode)
            staged_log = setup_logging(log_path, ctx.world, staged=args.mode == "predict", append=bool(args.resume),
                                       arguments=checkpoint_args(args))
            if auto_channels_last:
                log.info("channels-last auto -> %s (%s, %s)", "on" if args.channels_last else "off", device.type,
                         precision)
            if args.mode == "train":
                train(settings, ctx, checkpoint_args(args))  # each checkpoint records the parsed values
            else:
                {"val": validate, "predict": predict}[args.mode](settings, ctx)
            if staged_log:
                set_log_handlers([logging.StreamHandler(sys.stderr)])  # closes the file before it is renamed
                os.replace(*staged_log)
    except (errors.CellpaintError, FloatingPointError, OSError) as e:
        if args.debug:
            raise
        log.error("%s", errors.one_line(e))
        return errors.exit_status(e)
    except RuntimeError as e:
        # the collate of a batch whose sites differ in size: a data problem that --mode check names
        if args.debug or "stack expects each tensor to be equal size" not in str(e):
            raise
        log.error("the sites of a batch differ in size (%s); python main.py --mode check --data %s names the "
                  "images", str(e).splitlines()[0], args.data)
        return errors.FAILED
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        log.error("%s", interrupted(args, ctx.epoch_now))
        return errors.exit_status(e)  # 130
    finally:
        distributed.shutdown()
        torch.set_num_threads(threads)
    return 0


def interrupted(args, epoch: int | None) -> str:
    """What Ctrl-C stopped, and how to go on from the newest complete checkpoint."""
    if args.mode != "train":
        return f"interrupted: --mode {args.mode} wrote nothing; run the same command again"
    if epoch is None:
        return "interrupted before the first epoch; nothing was written but the log"
    done = [k for k in range(epoch, -1, -1) if Path(f"{args.save}.{k}").is_file()]
    if not done:
        return f"interrupted in epoch {epoch}, before its checkpoint; start the run again"
    return f"interrupted in epoch {epoch}; continue with --resume {args.save}.{done[0]}"


if __name__ == "__main__":
    sys.exit(main())
