"""Same-domain batches (--batch-sampling plate|experiment, the 5th place): every training batch from
the sites of one plate (or one experiment), so BatchNorm's batch statistics are those of one
domain, as they are at inference with AdaBN (--adabn).

`domain_codes` names each site's domain; `group_batches` deals one epoch's global batches:
each group's sites shuffled, cut to a multiple of the process count and split into near-equal
batches of at most `batch * processes` (a group smaller than that is one batch), and the batches
of all groups shuffled together. The dealing depends on the seed alone, so a resumed run draws
the same batches. engine/distributed.py's GroupBatchSampler gives each process its share.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

DOMAINS = ("plate", "experiment")


def domain_keys(rows: pd.DataFrame, by: str) -> np.ndarray:
    """Each row's domain as text: its experiment, or its experiment and plate."""
    if by not in DOMAINS:
        raise ValueError(f"unknown domain {by!r} (choose from {', '.join(DOMAINS)})")
    experiment = rows["experiment"].astype(str).to_numpy()
    if by == "experiment":
        return experiment
    return np.char.add(np.char.add(experiment.astype(str), "/"), rows["plate"].astype(str).to_numpy().astype(str))


def group_batches(groups: np.ndarray, batch: int, processes: int, seed: int) -> list[np.ndarray]:
    """One epoch's global batches (positions into `groups`), each from a single group.

    Each group's positions are shuffled and cut to a multiple of `processes` (at most
    processes - 1 left out, others each epoch), then split into the fewest batches of at most
    `batch * processes` positions, as equal as multiples of `processes` allow. No process gets a
    share of 1 sample (it breaks BatchNorm's training statistics) unless `batch` is 1: a group
    with fewer than 2 * processes positions is left out, and with `batch` 2 an odd share count
    drops one more. Every process then gets an equal share of every batch from the same group.
    The batches of all groups come in a shuffled order.
    """
    if batch < 1 or processes < 1:
        raise ValueError(f"batch and processes must be >= 1, got {batch} and {processes}")
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    batches: list[np.ndarray] = []
    uniques, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    bounds = np.flatnonzero(np.diff(inverse.reshape(-1)[order])) + 1
    least = 2 if batch >= 2 else 1  # a process's smallest share (-b 1: one sample, as asked)
    for members in np.split(order, bounds) if order.size else []:
        units = len(members) // processes  # per process
        if units < least:
            continue
        parts = min(-(-units // batch), units // least)
        units = min(units, parts * batch)  # -b 2 and an odd count: one unit fewer, no share of 1
        members = rng.permutation(members)[:units * processes]
        sizes = [(units // parts + (i < units % parts)) * processes for i in range(parts)]
        batches.extend(np.split(members, np.cumsum(sizes)[:-1]))
    return [batches[i] for i in rng.permutation(len(batches))]
