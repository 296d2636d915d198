"""One training epoch: batches -> loss -> gradient (accumulated) -> optimizer steps."""
from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dataset
from cellpaint.core.errors import Diverged
from cellpaint.core.settings import Settings
from cellpaint.data.augment import resize_batch
from cellpaint.engine import distributed, mixing
from cellpaint.engine.context import RunContext
from model import smooth_labels, training_loss

log = logging.getLogger("cellpaint")


def train_one_epoch(s: Settings, ctx: RunContext, model, loader, optimizer, scaler, epoch: int, n_classes: int,
                    guard: dict, classes: torch.Tensor | None = None, ema=None) -> dict:
    """One pass over `loader`; `guard["bad_steps"]` counts non-finite losses in a row across epochs;
    `ema` (engine/ema.py WeightAverage, --model-ema) is updated after every optimizer step."""
    o, ex, world, device, dtype = s.optim, s.exec, ctx.world, ctx.device, s.exec.autocast_dtype
    model.train()
    # cutmix/mixup draws, reproducible on resume (and different in each process of a distributed run)
    rng = np.random.default_rng((s.seed, epoch, 7, *([world.rank] if world.distributed else [])))
    steps = len(loader)
    total_loss = correct = seen = 0.0
    tic = time.time()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if world.main else True)
    settings = s.augment
    classes = None if classes is None else classes.to(device)
    # "sum" (the 1st place): each batch's gradient is added at full weight, so an update sees the
    # summed gradient of its batches and Adam's coupled weight decay keeps its weight; a trailing
    # partial group is dropped (zeroed after the loop) as the original did. "mean" divides the loss
    # by the group size and steps on the trailing group too.
    scale = 1.0 if o.accumulation == "sum" else 1.0 / o.gradient_accumulation
    size = None if o.image_size_schedule is None else o.image_size_schedule.size_at(epoch)
    if size is not None:
        log.info("epoch %d: training images resized to an edge of %d px (--image-size-schedule)", epoch, size)
    for i, (x, cell, _, y) in enumerate(bar):
        lr = o.lr(epoch + i / steps, o.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        # flips, zoom, normalisation, jitter: on the device, per batch
        x = dataset.prepare_batch(x, device, settings=settings)
        if size is not None:  # progressive resizing, after the augmentation, on the device
            x = resize_batch(x, size)
        cell, y = cell.to(device, non_blocking=True), y.to(device)
        target = smooth_labels(y, n_classes, o.label_smoothing)
        x, cell, target = mixing.mix_batch(x, cell, target, o.mixup, o.cutmix, rng, o.mix_partners)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, cell)
            loss = training_loss(out, target, o.loss, o.metric_loss_coeff, classes)
        if not distributed.all_true(bool(torch.isfinite(loss)), world):  # all processes skip, or none
            # one bad batch is skipped like the grad scaler skips overflowing steps; a run of them
            # means the model has diverged, and the last good checkpoint must stay the newest
            guard["bad_steps"] += 1
            log.warning("epoch %d batch %d: non-finite loss, step skipped (%d in a row)", epoch, i, guard["bad_steps"])
            if guard["bad_steps"] >= ex.max_bad_steps:
                raise Diverged(f"the loss was not finite for {guard['bad_steps']} steps in a row "
                               f"(epoch {epoch}); stopping, the checkpoints of earlier epochs are kept")
            optimizer.zero_grad(set_to_none=True)
            continue
        guard["bad_steps"] = 0
        step = (i + 1) % o.gradient_accumulation == 0 or (o.accumulation == "mean" and i + 1 == steps)
        # accumulating steps need no gradient all-reduce: only the last one before optimizer.step
        with contextlib.nullcontext() if step or not isinstance(model, DistributedDataParallel) else model.no_sync():
            scaler.scale(loss * scale).backward()
        if step:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
        total_loss += loss.item() * len(x)
        correct += (out["logits"].argmax(1) == target.argmax(1)).sum().item()
        seen += len(x)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{lr:.2e}")
        if (i + 1) % ex.disp_batches == 0:
            log.info("epoch %d batch %d/%d: loss %.4f, acc %.4f, lr %.3g, %.1f samples/s", epoch, i + 1,
                     steps, total_loss / seen, correct / seen, lr, seen / (time.time() - tic))
    optimizer.zero_grad(set_to_none=True)  # a trailing partial group ("sum") never steps
    total_loss, correct, seen = distributed.sum_all([total_loss, correct, seen], world)
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "lr": lr if steps else 0.0}


