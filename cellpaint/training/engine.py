"""The machinery of a run: metadata table -> samples -> batches -> logits.

The modes (training/run.py, prediction/predict.py) are made of what this module holds: the data
of a run (`load_data`), datasets and loaders (`make_dataset`, `make_loader`), the model and
optimizer (`build_model`, `make_optimizer`, `prepare_model`), one training epoch
(`train_one_epoch`), inference with TTA (`infer`) and validation (`evaluate`). Functions take
typed settings (settings.py) and, where they need the process group or the device, the run's
`RunContext`; none reads the command line. The model, optimizer and loaders are the caller's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset
from cellpaint.data import images, metadata
from cellpaint.data.folds import assign_folds, last_experiments, named_folds, split_subsets
from cellpaint.data.image_cache import ImageCache
from cellpaint.data.layout_matches import apply_layout_matches, find_layout_matches
from cellpaint.data.structure import Structure, derive_structure
from cellpaint.data.wells import sum_sites
from cellpaint.training import autoselect, distributed, mixing
from cellpaint.training.settings import DataSettings, ModelSettings, OptimSettings, RunContext, Settings
from model import CellClassifier, smooth_labels, training_loss

log = logging.getLogger("cellpaint")


# ------------------------------------------------------------------------------------- the data


@dataclass
class Data:
    table: pd.DataFrame
    structure: Structure
    subsets: dict[str, pd.DataFrame]
    pixel_stats: pd.DataFrame | None
    image_cache: ImageCache | None = None  # --image-cache, opened and checked once per run


def load_data(d: DataSettings, training: bool = True) -> Data:
    """Metadata table, derived structure, layout coincidences and the train/val/test subsets
    (`training`: warn when fine-tuning one cell type leaves nothing to validate)."""
    table = metadata.load_table(d.root)
    matches = find_layout_matches(table)
    for m in matches:
        log.info("layout coincidence: test %s repeats train %s with plates shifted by %d (%d control wells) "
                 "-> %s", m.test, m.train, m.shift, m.wells_compared, "used" if d.use_layout_leak else "not used")
    if d.use_layout_leak and matches:
        table = apply_layout_matches(table, matches)
    structure = derive_structure(table, d.classes)
    if d.val_last_experiment:  # the 41st place's split: each cell type's last train experiment
        folds, cv_number = named_folds(table, last_experiments(table)), 0
    elif d.val_experiments:
        folds, cv_number = named_folds(table, d.val_experiments), 0
    else:
        folds, cv_number = assign_folds(table, d.folds, d.data_split_seed), d.cv_number
    subsets = split_subsets(table, folds, cv_number, d.all_controls_train)
    if not d.train_controls:  # treatment wells only (the 41st place trained on train.csv alone)
        train = subsets["train"]
        subsets["train"] = train[train["well_type"] == metadata.TREATMENT].reset_index(drop=True)
    if d.finetune_cell_type:
        if d.finetune_cell_type not in structure.cell_types:
            raise metadata.DataError(f"--finetune-cell-type {d.finetune_cell_type}: not among the cell types "
                                     f"{', '.join(structure.cell_types)}")
        # train, validate, pseudo-label and predict this cell type only; the model keeps its
        # full class and cell-type outputs so a general checkpoint loads unchanged
        subsets = {k: v[v["cell_type"] == d.finetune_cell_type].reset_index(drop=True) for k, v in subsets.items()}
        if training and subsets["val"].empty:
            log.warning("--finetune-cell-type %s: the validation experiments hold none of its wells, so nothing "
                        "is validated and the best checkpoint is simply the latest epoch (choose a fold with "
                        "--cv-number or --val-experiments, or --val-last-experiment)", d.finetune_cell_type)
    log.info("data %s: %d sites, %d classes (%d treatment in %d plate groups), cell types %s; "
             "sites: train %d, val %d, test %d", d.root, len(table), structure.n_classes,
             len(structure.treatment_classes), structure.n_groups, ",".join(structure.cell_types),
             *(len(subsets[k]) for k in ("train", "val", "test")))
    stats = None
    if d.normalization != "sample":
        if d.stats_cache is None:
            raise metadata.DataError(f"--data-normalization {d.normalization} needs a folder for the pixel "
                                     "statistics: give --cache-dir")
        stats = dataset.load_pixel_stats(d.root, table, d.stats_cache)
    cache = ImageCache.open(d.image_cache, d.root, table) if d.image_cache else None
    return Data(table, structure, subsets, stats, cache)


def make_dataset(d: DataSettings, data: Data, rows: pd.DataFrame, augment: dataset.Augment | None = None,
                 labels=None) -> dataset.SiteDataset:
    """The sites `rows`; training draws `augment` (None: inference)."""
    stats = dataset.normalization_stats(rows, d.normalization, data.pixel_stats, data.table)
    # uint8 samples: the loader workers only decode; prepare_batch does the float work per batch on the device.
    return dataset.SiteDataset(rows, data.structure.cell_types, d.normalization, stats,
                               augment, labels, seed=d.seed, output="uint8", cache=data.image_cache,
                               skip_bad_images=d.skip_bad_images)


def make_loader(d: DataSettings, world: distributed.World, ds: dataset.SiteDataset,
                epoch: int | None = None) -> DataLoader:
    """This process's share of `ds`: shuffled (seeded by seed and epoch, so a resumed run draws the
    same order) when `epoch` is given, in order otherwise. A training sampler holds whole batches
    only (the trailing partial one is dropped, unless it is all there is): see ShardSampler."""
    if epoch is not None:
        ds.set_epoch(epoch)
        sampler = distributed.ShardSampler(len(ds), world, d.seed * 100_003 + epoch, batch=d.batch_size)
    else:
        sampler = distributed.ShardSampler(len(ds), world)
    # batches drop (and count, logging the count per pass) sites whose images are unreadable (--skip-bad-images)
    return dataset.SkippingLoader(ds, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers,
                                  pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                                  description="inference" if epoch is None else f"epoch {epoch}")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode PNGs; many threads each would only fight over cores
    # Ctrl-C reaches the whole process group: the main process stops the run (one line, exit 130)
    # and shuts the workers down; each worker's own KeyboardInterrupt traceback would bury that line
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------- model, state


def amp_dtype(precision: str, fp16: bool, device: torch.device) -> torch.dtype | None:
    """Autocast's dtype for --precision (auto: fp16 on CUDA when --fp16) on `device`; None: fp32."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" and fp16 else "fp32"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """'fp16', 'bf16' or 'fp32': the autocast dtype of `amp_dtype` as the name the measured figures use."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[dtype]


def site_image_size(data: Data) -> tuple[int, int] | None:
    """(height, width) of the run's images: the cache's, or the first training site's PNG header."""
    if data.image_cache is not None:
        return data.image_cache.size
    rows = next((r for r in (data.subsets["train"], data.table) if len(r)), None)
    return None if rows is None else images.png_size(f"{rows['image_prefix'].iloc[0]}_w1.png")


def _least_free_gpu_memory(device: torch.device, world) -> int:
    """Free memory of this process's GPU, the least over the processes of a torchrun: every process
    must build the same network, and it has to fit on the fullest card."""
    free = torch.cuda.mem_get_info(device)[0]
    if not world.distributed:
        return free
    values = [0.0] * world.size
    values[world.rank] = float(free)
    return int(min(distributed.sum_all(values, world)))


def resolve_backbone(m: ModelSettings, ctx: RunContext, data: Data, batch_size: int, state: dict | None = None,
                     training: bool = True) -> ModelSettings:
    """`m` with `--backbone auto` replaced by a real name (the caller records it), logging why.

    A checkpoint being resumed or fine-tuned keeps its own backbone; between densenet161 and
    mem-densenet161 (one set of weights) the choice is made again for this device. Inference always
    takes densenet161: the memory-efficient variant saves memory only when gradients are kept."""
    if m.backbone != autoselect.AUTO:
        return m
    made_with = (state or {}).get("args", {}).get("backbone")
    if made_with and not autoselect.is_densenet161_pair(made_with):
        log.info("backbone auto -> %s: the backbone the checkpoint was made with", made_with)
        return dataclasses.replace(m, backbone=made_with)
    if not training:
        log.info("backbone auto -> %s: inference keeps no activations for the backward pass, so the "
                 "memory-efficient variant would save nothing", autoselect.FAST)
        return dataclasses.replace(m, backbone=autoselect.FAST)
    size = site_image_size(data)
    if size is None:
        size = (512, 512)
        log.warning("image size unknown (first training image unreadable): the backbone choice assumes 512x512")
    device = ctx.device
    free = _least_free_gpu_memory(device, ctx.world) if device.type == "cuda" else None
    choice = autoselect.choose_backbone(device.type, precision_name(ctx.dtype), batch_size, size, free)
    log.info("backbone auto -> %s: %s", choice.backbone, choice.reason)
    return dataclasses.replace(m, backbone=choice.backbone)


def build_model(m: ModelSettings, n_classes: int, n_cell_types: int, pretrained: str) -> CellClassifier:
    return CellClassifier(m.backbone, n_classes, n_cell_types, embedding_size=m.embedding_size,
                          head_hidden=None if m.head_hidden is None else list(m.head_hidden),
                          concat_cell_type=m.concat_cell_type, bn_mom=m.bn_mom, pretrained=pretrained,
                          stem_init=m.stem_init, head=m.head)


def loss_classes(o: OptimSettings, data: Data) -> torch.Tensor | None:
    """The classes the loss is taken over: all (None), or the treatment classes (`--loss-classes
    treatment`: the 41st place's outputs, which had no control classes)."""
    if o.loss_classes == "all":
        return None
    return torch.as_tensor(data.structure.treatment_classes, dtype=torch.long)


def lr_param_groups(o: OptimSettings, model: CellClassifier) -> list[dict]:
    """Parameter groups with their `lr_mult`: the backbone's parameters named by `--lr-groups`
    prefixes at those multipliers (the 41st place: stem 1/3, dense blocks 1/2), the rest of the
    backbone at `--backbone-lr-mult`, neck and heads at 1x. A prefix matching no parameter name
    is an error (a typo would otherwise silently train at the wrong rate)."""
    named = list(model.backbone.named_parameters())
    spec = o.lr_groups.groups if o.lr_groups else ()
    for prefixes, _ in spec:
        for prefix in prefixes:
            if not any(name.startswith(prefix) for name, _ in named):
                tops = sorted({name.split(".")[0] for name, _ in named})
                raise metadata.DataError(f"--lr-groups: no backbone parameter name starts with {prefix!r} "
                                         f"(top-level names: {', '.join(tops[:12])})")
    buckets: list[list] = [[] for _ in spec]
    rest = []
    for name, param in named:
        index = o.lr_groups.group_of(name) if spec else None
        (rest if index is None else buckets[index]).append(param)
    groups = [{"params": b, "lr_mult": mult, "name": ",".join(prefixes)} for b, (prefixes, mult) in zip(buckets, spec)]
    if rest:
        groups.append({"params": rest, "lr_mult": o.backbone_lr_mult, "name": "backbone"})
    in_backbone = {id(p) for _, p in named}
    head = [p for p in model.parameters() if id(p) not in in_backbone]
    return groups + [{"params": head, "lr_mult": 1.0, "name": "neck and heads"}]


def make_optimizer(o: OptimSettings, model: CellClassifier) -> torch.optim.Optimizer:
    """Adam over `lr_param_groups`, each at its multiple of the schedule's rate."""
    groups = lr_param_groups(o, model)
    lr = o.lr(0, o.epochs)
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    return torch.optim.Adam(groups, lr=lr, weight_decay=o.wd)


def prepare_model(m: ModelSettings, ctx: RunContext, model: CellClassifier, training: bool) -> torch.nn.Module:
    """The module the loops call: channels-last and/or compiled on request, and for `training` in a
    torchrun wrapped in DDP. Checkpoints keep saving the plain `model` (a compiled wrapper would
    prefix every weight's name)."""
    device, world = ctx.device, ctx.world
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    if m.channels_last:
        model.to(memory_format=torch.channels_last)
    if m.sync_bn and training and world.distributed:
        if device.type != "cuda":
            raise metadata.DataError("--sync-bn needs GPUs (torchrun with NCCL): PyTorch's SyncBatchNorm "
                                     "does not run on the CPU")
        # batch statistics over all processes' samples: matters when -b per GPU is small. The
        # layers are swapped inside `model`, so checkpoints keep the same weight names.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    runner = torch.compile(model) if m.compile else model
    if world.distributed and training:
        # a head the loss does not use (c = 0 or 1) gets no gradient: DDP must be told to expect that
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=not 0 < m.metric_loss_coeff < 1)
    return runner


def unwrap(runner: torch.nn.Module) -> torch.nn.Module:
    """The module for inference: without DDP, whose forward would sync buffers across processes that
    may run different numbers of inference batches."""
    return runner.module if isinstance(runner, DistributedDataParallel) else runner


# ------------------------------------------------------------------------------- train and infer


def train_one_epoch(s: Settings, ctx: RunContext, model, loader, optimizer, scaler, epoch: int, n_classes: int,
                    guard: dict, classes: torch.Tensor | None = None) -> dict:
    """One pass over `loader`; `guard["bad_steps"]` counts non-finite losses in a row across epochs."""
    o, world, device, dtype = s.optim, ctx.world, ctx.device, ctx.dtype
    model.train()
    # cutmix/mixup draws, reproducible on resume (and different in each process of a distributed run)
    rng = np.random.default_rng((o.seed, epoch, 7, *([world.rank] if world.distributed else [])))
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
    for i, (x, cell, _, y) in enumerate(bar):
        lr = o.lr(epoch + i / steps, o.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        # flips, zoom, normalisation, jitter: on the device, per batch
        x = dataset.prepare_batch(x, device, settings=settings)
        cell, y = cell.to(device, non_blocking=True), y.to(device)
        target = smooth_labels(y, n_classes, o.label_smoothing)
        x, cell, target = mixing.mix_batch(x, cell, target, o.mixup, o.cutmix, rng, o.mix_partners)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, cell)
            loss = training_loss(out, target, o.loss, s.model.metric_loss_coeff, classes)
        if not distributed.all_true(bool(torch.isfinite(loss)), world):  # all processes skip, or none
            # one bad batch is skipped like the grad scaler skips overflowing steps; a run of them
            # means the model has diverged, and the last good checkpoint must stay the newest
            guard["bad_steps"] += 1
            log.warning("epoch %d batch %d: non-finite loss, step skipped (%d in a row)", epoch, i, guard["bad_steps"])
            if guard["bad_steps"] >= o.max_bad_steps:
                raise FloatingPointError(f"the loss was not finite for {guard['bad_steps']} steps in a row "
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
        total_loss += loss.item() * len(x)
        correct += (out["logits"].argmax(1) == target.argmax(1)).sum().item()
        seen += len(x)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{lr:.2e}")
        if (i + 1) % o.disp_batches == 0:
            log.info("epoch %d batch %d/%d: loss %.4f, acc %.4f, lr %.3g, %.1f samples/s", epoch, i + 1,
                     steps, total_loss / seen, correct / seen, lr, seen / (time.time() - tic))
    optimizer.zero_grad(set_to_none=True)  # a trailing partial group ("sum") never steps
    total_loss, correct, seen = distributed.sum_all([total_loss, correct, seen], world)
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "lr": lr if steps else 0.0}


def infer(s: Settings, ctx: RunContext, model, ds: dataset.SiteDataset,
          embeddings: bool = False) -> dict[str, np.ndarray]:
    """Per-site logits (and embeddings) of a dataset, averaged over `--tta` views, or with
    `--tta-random N` over N passes of the training augmentation (pass p draws what epoch p of
    training would, so a run is reproducible). Sites skipped as unreadable (--skip-bad-images)
    get NaN rows, which `sum_sites` leaves out."""
    tta_random = s.inference.tta_random
    if isinstance(model, DistributedDataParallel):  # every process scores its shard with rank 0's network
        distributed.broadcast_buffers(model.module, ctx.world)
    if not tta_random:
        return infer_pass(s, ctx, model, ds, embeddings)
    saved = ds.augment, ds.epoch
    ds.augment = s.augment
    total: dict[str, np.ndarray] = {}
    try:
        for p in range(tta_random):
            ds.set_epoch(p)
            for key, value in infer_pass(s, ctx, model, ds, embeddings, ds.augment).items():
                total[key] = total[key] + value if key in total else value
    finally:
        ds.augment, ds.epoch = saved
    return {key: value / tta_random for key, value in total.items()}


@torch.inference_mode()
def infer_pass(s: Settings, ctx: RunContext, model, ds: dataset.SiteDataset, embeddings: bool = False,
               settings: dataset.Augment | None = None) -> dict[str, np.ndarray]:
    """One pass of `infer` over `ds` (augmented by its draws, applied as `settings` say), each batch
    averaged over `--tta` views. Each process of a distributed run infers its shard; all get
    the whole result."""
    tta, device, world = s.inference.tta, ctx.device, ctx.world
    model = unwrap(model)
    model.eval()
    outputs: dict[str, list] = {"logits": [], "embedding": []}
    done: list[np.ndarray] = []  # dataset rows inferred (all, unless --skip-bad-images dropped some)
    loader = make_loader(s.data, world, ds)
    for x, cell, index, _ in tqdm(loader, desc="infer", leave=False, disable=None if world.main else True):
        done.append(index.numpy())
        x, cell = dataset.prepare_batch(x, device, settings=settings), cell.to(device, non_blocking=True)
        sums: dict[str, torch.Tensor] = {}
        for view in dataset.tta_views(x, tta, s.inference.tta_size):
            with torch.autocast(device.type, dtype=ctx.dtype or torch.float32, enabled=ctx.dtype is not None):
                out = model(view, cell)
            for key in ("logits", "embedding") if embeddings else ("logits",):
                sums[key] = sums.get(key, 0) + out[key].float()
        for key, value in sums.items():
            outputs[key].append((value / tta).cpu().numpy())
    result = {k: np.concatenate(v) for k, v in outputs.items() if v}
    rows = np.concatenate(done) if done else np.zeros(0, dtype=np.int64)
    return distributed.gather_rows(result, rows, len(ds), world)


def accuracy_by_cell_type(wells: pd.DataFrame, predicted: np.ndarray) -> dict[str, float]:
    correct = pd.Series(predicted == wells["sirna_true"].to_numpy()).groupby(wells["cell_type"].to_numpy())
    result = {f"acc_{k}": float(v) for k, v in correct.mean().items()}
    result["acc"] = float(np.mean(predicted == wells["sirna_true"].to_numpy())) if len(wells) else float("nan")
    return result


def evaluate(s: Settings, ctx: RunContext, model, data: Data) -> dict[str, float]:
    """Validation accuracy per cell type among treatment classes only: of each site alone
    (`--val-unit site`, the 1st place's score) or of wells, their sites' logits summed."""
    rows = data.subsets["val"]
    if rows.empty:
        return {}
    site_logits = infer(s, ctx, model, make_dataset(s.data, data, rows))["logits"]
    if s.inference.val_unit == "site":
        read = ~np.isnan(site_logits).any(1)  # sites skipped as unreadable (--skip-bad-images) are not scored
        wells, logits = rows[read], site_logits[read]
    else:
        wells, logits = sum_sites(rows, site_logits)
    mask = np.full(logits.shape[1], -np.inf, dtype=np.float32)
    mask[data.structure.treatment_classes] = 0
    return accuracy_by_cell_type(wells, (logits + mask).argmax(1))
