"""The train and val modes: a training run from first epoch to last, and the validation of a checkpoint.

main.py parses the command line and calls these with typed settings (settings.py), the run's
`RunContext` (process group, device, the checkpoint loaded while parsing) and, for training, the
plain parsed arguments each checkpoint records (`record`: what --resume and --load read back).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from cellpaint.core.atomic import atomic_write
from cellpaint.data import metadata
from cellpaint.modes import pseudo_labels
from cellpaint.engine import distributed
from cellpaint.engine.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, restore_weights, save_checkpoint
from cellpaint.engine.setup import (Data, build_model, evaluate, infer, load_data, loss_classes, make_dataset,
                                       make_loader, make_optimizer, prepare_model, resolve_backbone,
                                       train_one_epoch)
from cellpaint.core.settings import RunContext, Settings, save_settings
from model import CellClassifier
from tools.curves import plot_training_curves

log = logging.getLogger("cellpaint")


def train(s: Settings, ctx: RunContext, record: dict) -> None:
    """Train `s.optim.epochs` epochs (from the checkpoint of --resume, or --load's weights): a
    checkpoint per epoch, the best one, the metrics, the curves and the settings beside --save."""
    save = s.run.save
    torch.manual_seed(s.data.seed)
    data = load_data(s.data, training=True)
    # loaded and checked while parsing; dropped from the context so the optimizer state is not kept twice
    resume, ctx.resume_state = ctx.resume_state, None
    fine_tune, ctx.load_state = (ctx.load_state if not resume else None), None
    model_settings = resolve_backbone(s.model, ctx, data, s.data.batch_size, resume or fine_tune)
    s = dataclasses.replace(s, model=model_settings)
    record = {**record, "backbone": model_settings.backbone}  # checkpoints record the resolved name
    pretrained = "none" if (resume or fine_tune) else s.model.pretrained
    model = build_model(s.model, data.structure.n_classes, len(data.structure.cell_types), pretrained).to(ctx.device)
    optimizer = make_optimizer(s.optim, model)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)
    state = {"epoch": s.optim.start_epoch - 1, "best_acc": -1.0, "pseudo_labels": {}, "history": []}
    if resume is not None:
        restore_weights(model, resume, s.run.resume)
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        log.info("resumed %s after epoch %d", s.run.resume, state["epoch"])
    elif fine_tune is not None:
        restore_weights(model, fine_tune, s.run.load)
    check_classes(data, resume or fine_tune)
    fingerprint = check_data_set(s, data, resume or fine_tune)
    runner = prepare_model(s.model, ctx, model, training=True)
    if ctx.world.main:
        save_settings(f"{save}.args.json", s)

    guard = {"bad_steps": 0}
    for epoch in range(state["epoch"] + 1, s.optim.epochs):
        ctx.epoch_now = epoch  # for the message of an interruption
        if s.pseudo.first_epoch is not None and epoch >= s.pseudo.first_epoch:
            new = pseudo_labels.pseudo_label_epoch(
                s.pseudo, epoch, data, state["pseudo_labels"],
                lambda rows: infer(s, ctx, runner, make_dataset(s.data, data, rows))["logits"])
            state["pseudo_labels"].update(distributed.from_main(new, ctx.world))  # every process trains on one set
        rows, labels = pseudo_labels.training_rows(data.subsets, state["pseudo_labels"])
        loader = make_loader(s.data, ctx.world, make_dataset(s.data, data, rows, s.augment, labels), epoch)
        tic = time.time()
        metrics = train_one_epoch(s, ctx, runner, loader, optimizer, scaler, epoch, data.structure.n_classes,
                                  guard, loss_classes(s.optim, data))
        metrics.update(evaluate(s, ctx, runner, data))
        metrics.update(epoch=epoch, seconds=time.time() - tic, pseudo_labels=len(state["pseudo_labels"]))
        state["epoch"] = epoch
        state["history"].append(metrics)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in metrics.items()))
        checkpoint = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scaler": scaler.state_dict(), "args": record,
                      "n_classes": data.structure.n_classes, "cell_types": list(data.structure.cell_types),
                      "data_fingerprint": fingerprint}
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
    except OSError as e:
        log.warning("training curves not drawn: %s", e)


def check_classes(data: Data, state: dict | None) -> None:
    if state and "n_classes" in state and state["n_classes"] != data.structure.n_classes:
        raise metadata.DataError(f"the checkpoint predicts {state['n_classes']} classes but the data has "
                                 f"{data.structure.n_classes} (see --classes)")


def check_data_set(s: Settings, data: Data, state: dict | None) -> str:
    """The data set's fingerprint; a checkpoint made on another data set is refused on --resume (its
    pseudo-labels and history name wells of that one) and named on --load (fine-tuning or
    predicting elsewhere is legitimate, but should not pass unnoticed)."""
    fingerprint = metadata.fingerprint(data.table)
    made_on = (state or {}).get("data_fingerprint")
    if made_on and made_on != fingerprint:
        where = (state.get("args") or {}).get("data", "?")
        if s.run.resume:
            raise metadata.DataError(f"--resume {s.run.resume} was trained on another data set ({where}, fingerprint "
                                     f"{made_on}) than --data {s.data.root} (fingerprint {fingerprint}); its "
                                     "pseudo-labels and history belong to that one: start a new run with --load")
        log.warning("--load %s was trained on another data set (%s, fingerprint %s) than --data %s (fingerprint %s)",
                    s.run.load, where, made_on, s.data.root, fingerprint)
    return fingerprint


def write_metrics(path: str, history: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        pd.DataFrame(history).to_csv(f, index=False)


def load_for_inference(s: Settings, ctx: RunContext) -> tuple[Settings, Data, torch.nn.Module]:
    """The data and the network of --load, ready for inference (val and predict); `s` with the
    backbone resolved."""
    state, ctx.load_state = ctx.load_state or load_checkpoint(s.run.load), None  # its architecture is in s already
    data = load_data(s.data, training=False)
    check_classes(data, state)
    check_data_set(s, data, state)
    s = dataclasses.replace(s, model=resolve_backbone(s.model, ctx, data, s.data.batch_size,
                                                      training=False))  # a bare weights file
    model: CellClassifier = build_model(s.model, data.structure.n_classes, len(data.structure.cell_types), "none")
    restore_weights(model, state, s.run.load)
    return s, data, prepare_model(s.model, ctx, model.to(ctx.device), training=False)


def validate(s: Settings, ctx: RunContext) -> None:
    s, data, model = load_for_inference(s, ctx)
    metrics = evaluate(s, ctx, model, data)
    if not metrics:
        raise metadata.DataError("no validation experiments: choose a fold with --cv-number (not -1)")
    log.info("validation: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
