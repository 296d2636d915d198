"""The train mode: a training run from its first epoch to its last.

main.py calls `train` with the run's settings (already merged with the checkpoint of --resume or
the architecture of --load), its `RunContext` and that checkpoint. Each epoch: pseudo-labels
(from --pl-epoch), one pass of training, validation, then the checkpoint `<save>.<epoch>`, the best
one `<save>`, the metrics and the curves. Every checkpoint carries the resolved settings, so
--resume continues the run from any of them with nothing repeated.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch

from cellpaint.core.atomic import atomic_write
from cellpaint.core.errors import InputError, Interrupted, OutputError, UsageError
from cellpaint.core.settings import Settings, save_settings, settings_dict
from cellpaint.data import metadata
from cellpaint.engine import distributed
from cellpaint.engine.checkpoints import (CHECKPOINT_FORMAT, check_channels, check_classes, check_data_set, made_with,
                                          restore_weights, save_checkpoint)
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import load_data, make_dataset, make_loader, site_image_size
from cellpaint.engine.ema import WeightAverage
from cellpaint.engine.epoch import train_one_epoch
from cellpaint.engine.inference import evaluate, infer
from cellpaint.engine.setup import (build_model, check_input_sizes, loss_classes, make_optimizer, prepare_model,
                                    resolve)
from cellpaint.modes import pseudo_labels
from cellpaint.modes.curves import plot_training_curves

log = logging.getLogger("cellpaint")


def train(s: Settings, ctx: RunContext, resume: dict | None = None, init: dict | None = None,
          run_id: str = "") -> None:
    """Train `s.optim.epochs` epochs, continuing the checkpoint `resume` (--resume) or starting from
    the weights of `init` (--load); `run_id` goes into SAVE.args.json and every checkpoint (whose
    outputs these are: engine/run_owner.py). Ctrl-C or SIGTERM ends it with an `Interrupted` error
    that names the newest complete checkpoint to resume from."""
    progress = {"epoch": None}
    try:
        _train(s, ctx, resume, init, progress, run_id)
    except KeyboardInterrupt as e:
        raise Interrupted(interrupted_message(s.run.save, progress["epoch"]), e) from None


def _train(s: Settings, ctx: RunContext, resume: dict | None, init: dict | None, progress: dict,
           run_id: str) -> None:
    save = s.run.save
    data = load_data(s.data, s.exec, training=True)
    checkpoint_in = resume or init
    s = resolve(s, ctx, data, made_with=made_with(checkpoint_in), training=True)
    torch.manual_seed(s.seed)
    pretrained = "none" if checkpoint_in else s.model.pretrained
    check_channels(data, checkpoint_in, s.run.resume or s.run.load)
    model = build_model(s.model, data.structure.n_classes, len(data.structure.cell_types), pretrained,
                        in_channels=data.channels).to(ctx.device)
    check_input_sizes(s, model, data, ctx.device)
    optimizer = make_optimizer(s.optim, model)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=s.exec.autocast_dtype == torch.float16)
    state = {"epoch": s.optim.start_epoch - 1, "best_acc": -1.0, "pseudo_labels": {}, "history": []}
    if resume is not None:
        restore_weights(model, resume, s.run.resume)
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        log.info("resumed %s after epoch %d", s.run.resume, state["epoch"])
    elif init is not None:
        restore_weights(model, init, s.run.load)
    check_classes(data, checkpoint_in)
    fingerprint = check_data_set(s, data, checkpoint_in)
    check_trainable(s, data, ctx.world.size, state["pseudo_labels"])
    check_size_schedule(s, data)
    ema_state = None if resume is None or s.optim.model_ema is None else resume.get("model_ema")
    if resume is not None and s.optim.model_ema is not None and ema_state is None:
        raise InputError(f"--resume {s.run.resume}: the run keeps EMA weights (--model-ema) but this checkpoint "
                         "holds none")
    del resume, init, checkpoint_in  # the optimizer state is not kept twice
    runner = prepare_model(s, ctx, model, training=True)
    ema = None
    if s.optim.model_ema is not None:  # a copy of the prepared network (restored, channels-last, SyncBN)
        ema = WeightAverage(model, s.optim.model_ema)
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        del ema_state
    if ctx.world.main:
        save_settings(f"{save}.args.json", s, run_id)

    guard = {"bad_steps": 0}
    for epoch in range(state["epoch"] + 1, s.optim.epochs):
        progress["epoch"] = epoch
        if s.pseudo.first_epoch is not None and epoch >= s.pseudo.first_epoch:
            new = pseudo_labels.pseudo_label_epoch(
                s.pseudo, s.optim.epochs, epoch, data, state["pseudo_labels"],
                lambda rows: infer(s, ctx, inference_network(s, ctx, runner, ema),
                                   make_dataset(s, data, rows), data=data)["logits"])
            state["pseudo_labels"].update(distributed.from_main(new, ctx.world))  # every process trains on one set
        rows, labels = pseudo_labels.training_rows(data.subsets, state["pseudo_labels"])
        loader = make_loader(s, ctx.world, make_dataset(s, data, rows, s.augment, labels), epoch)
        tic = time.time()
        metrics = train_one_epoch(s, ctx, runner, loader, optimizer, scaler, epoch, data.structure.n_classes,
                                  guard, loss_classes(s.optim, data), ema)
        metrics.update(evaluate(s, ctx, inference_network(s, ctx, runner, ema), data))
        metrics.update(epoch=epoch, seconds=time.time() - tic, pseudo_labels=len(state["pseudo_labels"]))
        state["epoch"] = epoch
        state["history"].append(metrics)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in metrics.items()))
        checkpoint = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(),
                      "scaler": scaler.state_dict(), "settings": settings_dict(s),
                      "n_classes": data.structure.n_classes, "cell_types": list(data.structure.cell_types),
                      "channels": data.channels,
                      "data_fingerprint": fingerprint}
        if ema is not None:
            checkpoint["model_ema"] = ema.state_dict()
        acc = metrics.get("acc", epoch)  # without validation the latest epoch counts as the best
        is_best = acc >= state["best_acc"]  # a tie goes to the later epoch, as in the 1st place's code
        state["best_acc"] = max(acc, state["best_acc"])
        checkpoint.update(state)
        if ctx.world.main:
            save_checkpoint(f"{save}.{epoch}", checkpoint)
            if is_best:
                save_checkpoint(save, checkpoint)
            write_metrics(f"{save}.metrics.csv", state["history"])
    if not ctx.world.main:
        return
    try:  # pictures are a convenience: never fail a finished run over them
        plot_training_curves(Path(f"{save}.metrics.csv"), Path(f"{save}.curves.png"))
    except (OSError, OutputError) as e:
        log.warning("training curves not drawn: %s", e)


def check_trainable(s: Settings, data, processes: int, labelled: dict) -> None:
    """Refuse, before anything is written, a run that could not train: no treatment well to learn
    the classes from (validation took every train experiment), or an epoch that would take no
    optimizer step (-b times --gradient-accumulation more than the data). A data set without test
    wells only gets a warning: training needs none, predict refuses it."""
    d, o = s.data, s.optim
    rows, _ = pseudo_labels.training_rows(data.subsets, labelled)
    if not (rows["well_type"] == metadata.TREATMENT).any():
        val = sorted(data.subsets["val"]["experiment"].unique())
        why = ("--val-experiments" if d.val_experiments else "--val-last-experiment" if d.val_last_experiment
               else f"--folds {d.folds} --cv-number {d.cv_number}")
        cell = f" of {d.finetune_cell_type}" if d.finetune_cell_type else ""
        raise UsageError(f"no treatment well left to train on: {why} validates on {', '.join(val) or 'nothing'}, "
                         f"every train experiment{cell} (choose fewer validation experiments, or --cv-number -1)")
    global_batch = d.batch_size * processes
    batches = 1 if len(rows) <= global_batch else len(rows) // global_batch  # engine/distributed.py ShardSampler
    steps = batches // o.gradient_accumulation if o.accumulation == "sum" else -(-batches // o.gradient_accumulation)
    if steps == 0:
        on = f" on {processes} processes" if processes > 1 else ""
        raise UsageError(f"an epoch would take no optimizer step: the {len(rows)} training sites make {batches} "
                         f"batch(es) of -b {d.batch_size}{on}, and --gradient-accumulation {o.gradient_accumulation} "
                         "steps after every full group of that many batches (--accumulation-mode sum); lower -b or "
                         "--gradient-accumulation")
    if data.subsets["test"].empty:
        log.warning("the data set has no test wells (%s: a test.csv with only its header?): pseudo-labels come "
                    "from validation wells only, and --mode predict will refuse it", d.root)


def inference_network(s: Settings, ctx: RunContext, runner: torch.nn.Module,
                      ema: WeightAverage | None) -> torch.nn.Module:
    """What validates and pseudo-labels: the weight average when there is one (unless
    --inference-weights raw), else the network being trained."""
    if ema is None or s.inference.weights == "raw":
        return runner
    return ema.for_inference(ctx.world)


def check_size_schedule(s: Settings, data) -> None:
    """--image-size-schedule only shrinks the training images: a size above the data's is refused."""
    schedule = s.optim.image_size_schedule
    if schedule is None:
        return
    size = site_image_size(data)
    if size is not None and max(edge for edge, _ in schedule.steps) > max(size):
        raise UsageError(f"--image-size-schedule {schedule}: sizes above the data's images ({size[0]}x{size[1]}) "
                         "would only upsample them; give sizes up to the data's edge")
    if size is not None and schedule.steps[-1][0] != max(size):
        log.warning("--image-size-schedule %s ends at %d px, but validation and prediction run at the data's "
                    "%dx%d", schedule, schedule.steps[-1][0], *size)


def interrupted_message(save: str, epoch: int | None) -> str:
    """What Ctrl-C (or SIGTERM) stopped, and how to go on from the newest complete checkpoint."""
    if epoch is None:
        return "interrupted before the first epoch; nothing was written but the log"
    done = [k for k in range(epoch, -1, -1) if Path(f"{save}.{k}").is_file()]
    if not done:
        return f"interrupted in epoch {epoch}, before its checkpoint; start the run again"
    return f"interrupted in epoch {epoch}; continue with --resume {save}.{done[0]}"


def write_metrics(path: str, history: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        pd.DataFrame(history).to_csv(f, index=False)
