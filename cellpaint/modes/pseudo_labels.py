"""Pseudo-labelling: move the most confident unlabelled validation and test wells into training.

Once per epoch from `--pl-epoch`: predict the wells not yet labelled (sites summed), infer each
val/test plate's group from the predictions of its experiment, keep only that group's classes,
drop the classes the plate already has in training, rank wells by the margin between the best
and the second class, and take the most confident so that a fraction f(x) of all those wells is
in training by then, x = (epoch - pl + 1) / (epochs - pl + 1) as in the 1st place's code. A class
is never given to two wells of one plate: like the original, a taken well whose class went to a
more confident well of its plate this epoch is dropped, not replaced (`refill` replaces it). The
plate logic is plates.py's, shared with make_submission.py.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd

from cellpaint.core.settings import PseudoLabelSettings
from cellpaint.data import plates
from cellpaint.data.metadata import TREATMENT
from cellpaint.data.structure import Structure
from cellpaint.data.wells import sum_sites

log = logging.getLogger("cellpaint")


DUPLICATE_RULES = ("drop", "refill")


def pl_fraction(size_func: Callable[[float], float], epoch: int, pl_epoch: int, epochs: int) -> float:
    """f(x), clipped to [0, 1], with x = (epoch - pl_epoch + 1) / (epochs - pl_epoch + 1).

    The 1st place's schedule: x is already above 0 in the first pseudo-labelling epoch (so
    `--pl-size-func x` adds wells at once) and stays below 1 in the last, which leaves the least
    confident wells out (41.5% -> 98.5% for 0.6*x+0.4 over epochs 90..129 of 130).
    """
    x = (epoch - pl_epoch + 1) / max(epochs - pl_epoch + 1, 1)
    return min(max(size_func(x), 0.0), 1.0)


def candidate_sites(subsets: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Sites of the wells pseudo-labelling may label: the validation treatment wells, the unlabelled
    test wells (an RxRx1-WILDS split keeps control wells in those parts: they are never candidates)."""
    val, test = subsets["val"], subsets["test"]
    return pd.concat([val[val["well_type"] == TREATMENT], test[(test["sirna"] < 0) & (test["well_type"] == TREATMENT)]],
                     ignore_index=True)


def training_rows(subsets: dict[str, pd.DataFrame], pseudo_labels: dict[str, int]) -> tuple[pd.DataFrame, np.ndarray]:
    """The epoch's training sites: the train subset plus every site of the pseudo-labelled wells."""
    extra = candidate_sites(subsets)
    extra = extra[extra["id_code"].isin(pseudo_labels.keys())]
    rows = pd.concat([subsets["train"], extra], ignore_index=True)
    labels = np.concatenate([subsets["train"]["sirna"].to_numpy(),
                             extra["id_code"].map(pseudo_labels).to_numpy()]).astype(np.int64)
    return rows, labels


def taken_classes(wells: pd.DataFrame, labels: np.ndarray) -> dict[tuple[str, int], set[int]]:
    """Classes each plate already has in training (treatment wells only)."""
    taken: dict[tuple[str, int], set[int]] = {}
    for key, label in zip(zip(wells["experiment"], wells["plate"]), labels):
        taken.setdefault(key, set()).add(int(label))
    return taken


def select(wells: pd.DataFrame, logits: np.ndarray, structure: Structure, labelled: pd.DataFrame,
           labelled_classes: np.ndarray, count: int, duplicates: str = "drop") -> dict[str, int]:
    """Choose up to `count` wells and their labels, most confident first, unique per plate.

    `labelled`/`labelled_classes`: the val/test wells already in training, whose labels also
    vote for their plate's group (one-hot) and are excluded from their plate's candidates.
    `duplicates`: "drop" (the 1st place) takes the `count` most confident wells and drops each
    whose class a more confident well of its plate got, so fewer may be added; "refill" skips
    such a well and goes on down the ranking until `count` are chosen.
    """
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"unknown duplicate rule {duplicates!r} (choose from {', '.join(DUPLICATE_RULES)})")
    if count <= 0 or len(wells) == 0:
        return {}
    masks = structure.group_masks()
    both = pd.concat([wells[["experiment", "plate"]], labelled[["experiment", "plate"]]], ignore_index=True)
    # a labelled well votes for its plate's group with certainty: all its mass on its label
    votes = np.full((len(both), logits.shape[1]), -np.inf, dtype=np.float32)
    votes[:len(wells)] = logits
    votes[np.arange(len(wells), len(both)), labelled_classes] = 0
    groups = plates.infer_plate_groups(votes, both["experiment"].to_numpy(), both["plate"].to_numpy(), masks)
    scores = plates.restrict_to_groups(logits, groups[:len(wells)], masks)
    taken = taken_classes(labelled, labelled_classes)
    plate_keys = list(zip(wells["experiment"], wells["plate"]))
    codes = np.array([f"{e}\0{p}" for e, p in plate_keys], dtype=object)
    scores = plates.exclude_classes(scores, codes, {f"{e}\0{p}": c for (e, p), c in taken.items()}, inplace=True)
    best = scores.argmax(1)
    margin = plates.margins(scores)
    ranked = [i for i in np.argsort(-margin, kind="stable") if np.isfinite(scores[i, best[i]])]
    if duplicates == "drop":
        ranked = ranked[:count]
    chosen: dict[str, int] = {}
    for i in ranked:
        if len(chosen) == count:
            break
        key = plate_keys[i]
        if int(best[i]) in taken.setdefault(key, set()):
            continue  # the plate's class went to a more confident well this epoch
        taken[key].add(int(best[i]))
        chosen[wells["id_code"].iat[i]] = int(best[i])
    return chosen


def pseudo_label_epoch(p: PseudoLabelSettings, epochs: int, epoch: int, data, pseudo_labels: dict[str, int],
                       infer_sites: Callable[[pd.DataFrame], np.ndarray]) -> dict[str, int]:
    """The wells (id_code -> class) to add before training `epoch` of `epochs`; logs counts and val errors."""
    sites = candidate_sites(data.subsets)
    total = sites["id_code"].nunique()
    count = round(pl_fraction(p.size_func, epoch, p.first_epoch, epochs) * total) - len(pseudo_labels)
    if count <= 0 or total == 0:
        log.info("pseudo-labels: none added at epoch %d (%d of %d wells labelled)", epoch, len(pseudo_labels), total)
        return {}
    done = sites["id_code"].isin(pseudo_labels.keys())
    remaining = sites[~done]
    wells, logits = sum_sites(remaining, infer_sites(remaining))
    labelled = sites[done].drop_duplicates("id_code")
    new = select(wells, logits, data.structure, labelled,
                 labelled["id_code"].map(pseudo_labels).to_numpy(dtype=np.int64), count, p.duplicates)
    truth = wells.set_index("id_code")
    val_new = [c for c in new if truth.at[c, "split"] != "test"]  # val wells: of train (or WILDS val) experiments
    wrong = sum(new[c] != truth.at[c, "sirna_true"] for c in val_new)
    log.info("pseudo-labels at epoch %d: %d added of %d asked (%d val, %d of them wrong), %d of %d wells "
             "labelled", epoch, len(new), count, len(val_new), wrong, len(pseudo_labels) + len(new), total)
    return new
