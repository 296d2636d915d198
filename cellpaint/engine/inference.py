"""Inference: per-site logits (and embeddings) of a dataset with test-time augmentation, and the
validation accuracy computed from them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dataset
from cellpaint.core.settings import AugmentSettings, Settings
from cellpaint.data.wells import sum_sites
from cellpaint.engine import adabn, distributed
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import Data, make_dataset, make_loader
from cellpaint.engine.setup import unwrap


def infer(s: Settings, ctx: RunContext, model, ds: dataset.SiteDataset,
          embeddings: bool = False, data: Data | None = None) -> dict[str, np.ndarray]:
    """Per-site logits (and embeddings) of a dataset, averaged over `--tta` views, or with
    `--tta-random N` over N passes of the training augmentation (pass p draws what epoch p of
    training would, so a run is reproducible). Sites skipped as unreadable (--skip-bad-images)
    get NaN rows, which `sum_sites` leaves out. With --adabn, each plate's (experiment's) sites
    are inferred with BatchNorm statistics recomputed on that domain's sites of `data`
    (engine/adabn.py)."""
    tta_random = s.inference.tta_random
    if isinstance(model, DistributedDataParallel):  # every process scores its shard with rank 0's network
        distributed.broadcast_buffers(model.module, ctx.world)
    if not tta_random:
        return infer_pass(s, ctx, model, ds, embeddings, data=data)
    saved = ds.augment, ds.epoch
    ds.augment = s.augment
    total: dict[str, np.ndarray] = {}
    try:
        for p in range(tta_random):
            ds.set_epoch(p)
            for key, value in infer_pass(s, ctx, model, ds, embeddings, ds.augment, data).items():
                total[key] = total[key] + value if key in total else value
    finally:
        ds.augment, ds.epoch = saved
    return {key: value / tta_random for key, value in total.items()}


@torch.inference_mode()
def infer_pass(s: Settings, ctx: RunContext, model, ds: dataset.SiteDataset, embeddings: bool = False,
               settings: AugmentSettings | None = None, data: Data | None = None) -> dict[str, np.ndarray]:
    """One pass of `infer` over `ds` (augmented by its draws, applied as `settings` say), each batch
    averaged over `--tta` views. Each process of a distributed run infers its shard; all get
    the whole result."""
    tta, device, world, dtype = s.inference.tta, ctx.device, ctx.world, s.exec.autocast_dtype
    model = unwrap(model)
    model.eval()
    outputs: dict[str, list] = {"logits": [], "embedding": []}
    done: list[np.ndarray] = []  # dataset rows inferred (all, unless --skip-bad-images dropped some)
    # one network for all sites, or with --adabn one per plate (experiment), each for its sites
    parts = [(model, make_loader(s, world, ds))] if s.inference.adabn == "off" else \
        adabn.per_domain(s, ctx, model, ds, data)
    for net, loader in parts:
        for x, cell, index, _ in tqdm(loader, desc="infer", leave=False, disable=None if world.main else True):
            done.append(index.numpy())
            x, cell = dataset.prepare_batch(x, device, settings=settings), cell.to(device, non_blocking=True)
            sums: dict[str, torch.Tensor] = {}
            for view in dataset.tta_views(x, tta, s.inference.tta_size):
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = net(view, cell)
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
    (`--val-unit site`, the 1st place's score) or of wells, their sites' logits summed. On an
    RxRx1-WILDS split as WILDS scores its val part: every well, over all classes."""
    rows = data.subsets["val"]
    if rows.empty:
        return {}
    site_logits = infer(s, ctx, model, make_dataset(s, data, rows), data=data)["logits"]
    if s.inference.val_unit == "site":
        read = ~np.isnan(site_logits).any(1)  # sites skipped as unreadable (--skip-bad-images) are not scored
        wells, logits = rows[read], site_logits[read]
    else:
        wells, logits = sum_sites(rows, site_logits)
    mask = np.full(logits.shape[1], -np.inf, dtype=np.float32)
    mask[np.arange(logits.shape[1]) if data.wilds else data.structure.treatment_classes] = 0
    return accuracy_by_cell_type(wells, (logits + mask).argmax(1))
