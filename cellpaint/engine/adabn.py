"""--adabn plate|experiment: BatchNorm statistics of each domain recomputed before its logits (AdaBN).

The 5th place's test-time remedy for batch effects: a network normalises every feature by the
running statistics of its training batches, a mixture of all experiments; a plate of another
experiment is shifted and scaled away from them. AdaBN replaces the statistics, never the
weights: for each plate (or experiment) of the sites being inferred, a copy of the network
recomputes the running mean and variance of the backbone's BatchNorm layers on *all* sites of
that domain in the metadata (treatment and control wells, whatever part they belong to, so
validation, pseudo-labelling and prediction see the same statistics for a plate, however many
of its wells are still unlabelled), then takes the logits of the domain's sites in eval mode.

- Statistics: the cumulative average over batches of `-b` sites (momentum None), of the inputs
  without augmentation or TTA views, in the order of the metadata; under torchrun every process
  computes them on all of the domain's sites (the same batches as one process) and rank 0's are
  broadcast, so every process infers with one network and the result is that of one process.
- Only the backbone's BatchNorm layers: the neck's first BatchNorm normalises the cell-type
  one-hot too, which is constant within a plate (its variance 0 there would erase the cell type),
  and the embedding's layers see features already adapted.
- The network passed in is never changed (the copy is made once per pass).
"""
from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import dataset
from cellpaint.core.errors import UsageError
from cellpaint.core.settings import AugmentSettings, Settings
from cellpaint.data.sampling import domain_keys
from cellpaint.engine import distributed
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import Data, make_dataset, make_loader


def backbone_norms(model: torch.nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers AdaBN recomputes: the backbone's."""
    return [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]


def recompute_statistics(model: torch.nn.Module, batches, device: torch.device, dtype=None,
                         settings: AugmentSettings | None = None) -> None:
    """Replace the running statistics of `model`'s backbone BatchNorm layers (in place) by the
    cumulative average of those of `batches` ((x, cell, ...) as the loaders give them); the rest
    of the model stays in eval mode and nothing else changes."""
    norms = backbone_norms(model)
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches, not an exponential one
        bn.train()
    try:
        for x, cell, *_ in batches:
            x, cell = dataset.prepare_batch(x, device, settings=settings), cell.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(x, cell)
    finally:
        for bn in norms:
            bn.eval()


def per_domain(s: Settings, ctx: RunContext, model: torch.nn.Module, ds: dataset.SiteDataset,
               data: Data) -> Iterator[tuple[torch.nn.Module, object]]:
    """(network, loader) for each domain of `ds`'s sites: a copy of `model` whose BatchNorm
    statistics are those of the domain, and this process's share of the domain's sites. The copy
    is reused from one domain to the next: finish one loader before asking for the next pair."""
    if data is None:
        raise ValueError("--adabn needs the run's data (the sites of each domain)")
    by = s.inference.adabn
    keys = ds.domain_keys(by)
    table_keys = domain_keys(data.table, by)
    net = copy.deepcopy(model)
    if not backbone_norms(net):
        raise UsageError(f"--adabn {by}: the backbone has no BatchNorm layers whose statistics could be recomputed")
    for key in np.unique(keys):
        sites = data.table[table_keys == key]
        stats_loader = make_loader(s, distributed.World(), make_dataset(s, data, sites))  # every site, every process
        recompute_statistics(net, stats_loader, ctx.device, s.exec.autocast_dtype)
        distributed.broadcast_buffers(net, ctx.world)
        yield net, make_loader(s, ctx.world, ds, subset=np.flatnonzero(keys == key))
