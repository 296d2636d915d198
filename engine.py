"""The machinery of a run: metadata table -> samples -> batches -> logits.

main.py is the command line and the modes (train / val / predict); this module holds what they
are made of: the data of a run (`load_data`), datasets and loaders (`make_dataset`,
`make_loader`), the model and optimizer (`build_model`, `make_optimizer`, `prepare_model`), one
training epoch (`train_one_epoch`), inference with TTA (`infer`) and validation (`evaluate`).
Every function takes the parsed arguments; there is no other state.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import batch
import dataset
import distributed
import images
import metadata
from model import CellClassifier, combined_loss, smooth_labels

log = logging.getLogger("cellpaint")


# ------------------------------------------------------------------------------------- the data


@dataclass
class Data:
    table: pd.DataFrame
    structure: metadata.Structure
    subsets: dict[str, pd.DataFrame]
    pixel_stats: pd.DataFrame | None
    image_cache: images.ImageCache | None = None  # --image-cache, opened and checked once per run


def load_data(args: argparse.Namespace) -> Data:
    """Metadata table, derived structure, layout coincidences and the train/val/test subsets."""
    table = metadata.load_table(args.data)
    matches = metadata.find_layout_matches(table)
    for m in matches:
        log.info("layout coincidence: test %s repeats train %s with plates shifted by %d (%d control wells) "
                 "-> %s", m.test, m.train, m.shift, m.wells_compared, "used" if args.use_layout_leak else "not used")
    if args.use_layout_leak and matches:
        table = metadata.apply_layout_matches(table, matches)
    structure = metadata.derive_structure(table, args.classes)
    folds = metadata.assign_folds(table, args.folds, args.data_split_seed)
    subsets = metadata.split_subsets(table, folds, args.cv_number, args.all_controls_train)
    if args.finetune_cell_type:
        if args.finetune_cell_type not in structure.cell_types:
            raise metadata.DataError(f"--finetune-cell-type {args.finetune_cell_type}: not among the cell types "
                                     f"{', '.join(structure.cell_types)}")
        # train, validate, pseudo-label and predict this cell type only; the model keeps its
        # full class and cell-type outputs so a general checkpoint loads unchanged
        subsets = {k: v[v["cell_type"] == args.finetune_cell_type].reset_index(drop=True) for k, v in subsets.items()}
    log.info("data %s: %d sites, %d classes (%d treatment in %d plate groups), cell types %s; "
             "sites: train %d, val %d, test %d", args.data, len(table), structure.n_classes,
             len(structure.treatment_classes), structure.n_groups, ",".join(structure.cell_types),
             *(len(subsets[k]) for k in ("train", "val", "test")))
    stats = None
    if args.data_normalization != "sample":
        cache = args.cache_dir or Path(args.save or args.load).parent / "cache"
        stats = dataset.load_pixel_stats(args.data, table, cache)
    image_cache = images.ImageCache.open(args.image_cache, args.data, table) if args.image_cache else None
    return Data(table, structure, subsets, stats, image_cache)


def augment_from_args(args: argparse.Namespace) -> dataset.Augment:
    """The train augmentation flags as settings (a ValueError names a flag with a bad value)."""
    return dataset.Augment(min_scale=args.scale_aug, scale_std=args.pw_aug[0], bias_std=args.pw_aug[1],
                           rotate=args.rotate_aug, brightness=args.brightness_aug, contrast=args.contrast_aug,
                           gamma=args.gamma_aug)


def make_dataset(args, data: Data, rows: pd.DataFrame, train: bool, labels=None) -> dataset.SiteDataset:
    augment = augment_from_args(args) if train else None
    stats = dataset.normalization_stats(rows, args.data_normalization, data.pixel_stats)
    # uint8 samples: the loader workers only decode; prepare_batch does the float work per batch on the device.
    return dataset.SiteDataset(rows, data.structure.cell_types, args.data_normalization, stats,
                               augment, labels, seed=args.seed, output="uint8", cache=data.image_cache,
                               skip_bad_images=args.skip_bad_images)


def make_loader(args, ds: dataset.SiteDataset, epoch: int | None = None) -> DataLoader:
    """This process's share of `ds`: shuffled (seeded by seed and epoch, so a resumed run draws the
    same order) when `epoch` is given, in order otherwise."""
    if epoch is not None:
        ds.set_epoch(epoch)
    sampler = distributed.ShardSampler(len(ds), args.world, None if epoch is None else args.seed * 100_003 + epoch)
    # batches drop (and count, logging the count per pass) sites whose images are unreadable (--skip-bad-images)
    return dataset.SkippingLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_data_workers,
                                  drop_last=epoch is not None and len(sampler) > args.batch_size,
                                  pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                                  description="inference" if epoch is None else f"epoch {epoch}")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode PNGs; many threads each would only fight over cores
    # Ctrl-C reaches the whole process group: the main process stops the run (one line, exit 130)
    # and shuts the workers down; each worker's own KeyboardInterrupt traceback would bury that line
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------- model, state


def amp_dtype(args, device: torch.device) -> torch.dtype | None:
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" and args.fp16 else "fp32"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def build_model(args, n_classes: int, n_cell_types: int, pretrained: str) -> CellClassifier:
    return CellClassifier(args.backbone, n_classes, n_cell_types, embedding_size=args.embedding_size,
                          head_hidden=args.head_hidden, concat_cell_type=args.concat_cell_type,
                          bn_mom=args.bn_mom, pretrained=pretrained)


def make_optimizer(args, model: CellClassifier) -> torch.optim.Optimizer:
    """Adam with two parameter groups: the backbone at `--backbone-lr-mult` times the schedule's
    rate (the 41st-place recipe fine-tuned pretrained layers more gently), the rest at 1x."""
    backbone = list(model.backbone.parameters())
    in_backbone = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in in_backbone]
    groups = [{"params": backbone, "lr_mult": args.backbone_lr_mult, "name": "backbone"},
              {"params": head, "lr_mult": 1.0, "name": "neck and heads"}]
    lr = args.lr(0, args.epochs)
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    return torch.optim.Adam(groups, lr=lr, weight_decay=args.wd)


def prepare_model(args, model: CellClassifier, device: torch.device) -> torch.nn.Module:
    """The module the loops call: channels-last and/or compiled on request. Checkpoints keep
    saving the plain `model` (a compiled wrapper would prefix every weight's name)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and args.mode == "train" and args.world.distributed:
        if device.type != "cuda":
            raise metadata.DataError("--sync-bn needs GPUs (torchrun with NCCL): PyTorch's SyncBatchNorm "
                                     "does not run on the CPU")
        # batch statistics over all processes' samples: matters when -b per GPU is small. The
        # layers are swapped inside `model`, so checkpoints keep the same weight names.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    runner = torch.compile(model) if args.compile else model
    if args.world.distributed and args.mode == "train":
        # a head the loss does not use (c = 0 or 1) gets no gradient: DDP must be told to expect that
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=not 0 < args.metric_loss_coeff < 1)
    return runner


def unwrap(runner: torch.nn.Module) -> torch.nn.Module:
    """The module for inference: without DDP, whose forward would sync buffers across processes that
    may run different numbers of inference batches."""
    return runner.module if isinstance(runner, DistributedDataParallel) else runner


# ------------------------------------------------------------------------------- train and infer


def train_one_epoch(args, model, loader, optimizer, scaler, epoch: int, n_classes: int,
                    device: torch.device, dtype: torch.dtype | None, guard: dict) -> dict:
    model.train()
    # cutmix/mixup draws, reproducible on resume (and different in each process of a distributed run)
    rng = np.random.default_rng((args.seed, epoch, 7, *([args.world.rank] if args.world.distributed else [])))
    steps = len(loader)
    total_loss = correct = seen = 0.0
    tic = time.time()
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if args.world.main else True)
    for i, (x, cell, _, y) in enumerate(bar):
        lr = args.lr(epoch + i / steps, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        x = dataset.prepare_batch(x, device)  # flips, zoom, normalisation, jitter: on the device, per batch
        cell, y = cell.to(device, non_blocking=True), y.to(device)
        target = smooth_labels(y, n_classes, args.label_smoothing)
        x, cell, target = batch.mixup(x, cell, target, args.mixup, rng)
        x, cell, target = batch.cutmix(x, cell, target, args.cutmix, rng)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, cell)
            loss = combined_loss(out, target, args.metric_loss_coeff)
        if not distributed.all_true(bool(torch.isfinite(loss)), args.world):  # all processes skip, or none
            # one bad batch is skipped like the grad scaler skips overflowing steps; a run of them
            # means the model has diverged, and the last good checkpoint must stay the newest
            guard["bad_steps"] += 1
            log.warning("epoch %d batch %d: non-finite loss, step skipped (%d in a row)", epoch, i, guard["bad_steps"])
            if guard["bad_steps"] >= args.max_bad_steps:
                raise FloatingPointError(f"the loss was not finite for {guard['bad_steps']} steps in a row "
                                         f"(epoch {epoch}); stopping, the checkpoints of earlier epochs are kept")
            optimizer.zero_grad(set_to_none=True)
            continue
        guard["bad_steps"] = 0
        step = (i + 1) % args.gradient_accumulation == 0 or i + 1 == steps
        # accumulating steps need no gradient all-reduce: only the last one before optimizer.step
        with contextlib.nullcontext() if step or not isinstance(model, DistributedDataParallel) else model.no_sync():
            scaler.scale(loss / args.gradient_accumulation).backward()
        if step:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        total_loss += loss.item() * len(x)
        correct += (out["logits"].argmax(1) == target.argmax(1)).sum().item()
        seen += len(x)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{lr:.2e}")
        if (i + 1) % args.disp_batches == 0:
            log.info("epoch %d batch %d/%d: loss %.4f, acc %.4f, lr %.3g, %.1f samples/s", epoch, i + 1,
                     steps, total_loss / seen, correct / seen, lr, seen / (time.time() - tic))
    total_loss, correct, seen = distributed.sum_all([total_loss, correct, seen], args.world)
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "lr": lr if steps else 0.0}


@torch.inference_mode()
def infer(args, model, ds: dataset.SiteDataset, device, dtype, embeddings: bool = False) -> dict[str, np.ndarray]:
    """Per-site logits (and embeddings) of a dataset, averaged over `args.tta` views.

    Each process of a distributed run infers its shard; all get the whole result. Sites skipped as
    unreadable (--skip-bad-images) get NaN rows, which `metadata.sum_sites` leaves out."""
    model = unwrap(model)
    model.eval()
    outputs: dict[str, list] = {"logits": [], "embedding": []}
    done: list[np.ndarray] = []  # dataset rows inferred (all, unless --skip-bad-images dropped some)
    loader = make_loader(args, ds)
    for x, cell, index, _ in tqdm(loader, desc="infer", leave=False, disable=None if args.world.main else True):
        done.append(index.numpy())
        x, cell = dataset.prepare_batch(x, device), cell.to(device, non_blocking=True)
        sums: dict[str, torch.Tensor] = {}
        for view in dataset.tta_views(x, args.tta, args.tta_size):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(view, cell)
            for key in ("logits", "embedding") if embeddings else ("logits",):
                sums[key] = sums.get(key, 0) + out[key].float()
        for key, value in sums.items():
            outputs[key].append((value / args.tta).cpu().numpy())
    result = {k: np.concatenate(v) for k, v in outputs.items() if v}
    rows = np.concatenate(done) if done else np.zeros(0, dtype=np.int64)
    return distributed.gather_rows(result, rows, len(ds), args.world)


def accuracy_by_cell_type(wells: pd.DataFrame, predicted: np.ndarray) -> dict[str, float]:
    correct = pd.Series(predicted == wells["sirna_true"].to_numpy()).groupby(wells["cell_type"].to_numpy())
    result = {f"acc_{k}": float(v) for k, v in correct.mean().items()}
    result["acc"] = float(np.mean(predicted == wells["sirna_true"].to_numpy())) if len(wells) else float("nan")
    return result


def evaluate(args, model, data: Data, device, dtype) -> dict[str, float]:
    """Validation accuracy per cell type, scoring treatment wells among treatment classes only."""
    rows = data.subsets["val"]
    if rows.empty:
        return {}
    site_logits = infer(args, model, make_dataset(args, data, rows, train=False), device, dtype)["logits"]
    wells, logits = metadata.sum_sites(rows, site_logits)
    mask = np.full(logits.shape[1], -np.inf, dtype=np.float32)
    mask[data.structure.treatment_classes] = 0
    return accuracy_by_cell_type(wells, (logits + mask).argmax(1))
