"""Plate logic shared by the submission builder and the trainer's pseudo-labelling.

Each plate of an experiment holds one *plate group* of treatment classes, every class of it
in at most one well, and the plates of an experiment hold different groups. Everything here
exploits that structure on a matrix of per-well class scores (rows = wells, columns = classes):

- `infer_plate_groups`: which group each plate holds, chosen jointly per experiment;
- `restrict_to_groups`: classes outside a well's group -> -inf (`split_by_group`: the same,
                        as compact per-group blocks);
- `exclude_classes`:    classes a plate already has (e.g. labelled in training) -> -inf;
- `assign_plates`:      per plate, a maximum-score matching of wells to classes (Hungarian);
- `margins`:            best minus second-best score, the confidence used to rank pseudo-labels.

All functions are pure numpy over arrays of wells: a well is described by its row of scores and
its experiment/plate codes (any hashable values: strings or integers). Nothing here knows the
competition's sizes; the number of classes, groups and plates comes from the arrays given.
Scores of -inf mean "not a candidate" throughout.
"""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from cellpaint.core.settings import BALANCES, GROUP_METHODS

_CHUNK = 4096  # rows per block in row-wise transforms: bounds temporaries to a few MB


# ------------------------------------------------------------------------------ the LSA solver


@functools.lru_cache(maxsize=1)
def _solver() -> Callable:
    """scipy's `linear_sum_assignment`, loaded as cheaply as possible.

    `import scipy.optimize` costs ~0.7 s (it pulls in linalg, sparse, special, ...), a quarter of
    the submission builder's time budget, while the solver is a self-contained C extension
    (`scipy/optimize/_lsap*.so`, needing only numpy). Load that file on its own when it is
    there and behaves; fall back to the public import otherwise (e.g. another scipy layout).
    """
    try:
        spec = importlib.util.find_spec("scipy")  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                    path = Path(location) / "optimize" / f"_lsap{suffix}"
                    if path.is_file():
                        ext = importlib.util.spec_from_file_location("scipy.optimize._lsap", path)
                        module = importlib.util.module_from_spec(ext)
                        ext.loader.exec_module(module)
                        solve = module.linear_sum_assignment
                        rows, cols = solve(np.array([[0.0, 1.0], [1.0, 0.0]]), maximize=True)
                        if rows.tolist() == [0, 1] and cols.tolist() == [1, 0]:
                            return solve
    except Exception:  # any surprise in the shortcut: the public import below is always right
        pass
    from scipy.optimize import linear_sum_assignment
    return linear_sum_assignment


# ------------------------------------------------------------------------------------ helpers


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values, index of each value in them)."""
    uniques, inverse = np.unique(np.asarray(values), return_inverse=True)
    return uniques, inverse.reshape(-1)


def plate_ids(experiment_codes: np.ndarray, plate_codes: np.ndarray) -> np.ndarray:
    """A dense integer id per well for its (experiment, plate) pair.

    Plate numbers repeat across experiments (every experiment has a plate 1), so a plate is
    identified by the pair; this is the id to pass as `plate_codes` to the per-plate functions.
    """
    _, e = _codes(experiment_codes)
    _, p = _codes(plate_codes)
    _, ids = _codes(e.astype(np.int64) * (int(p.max(initial=0)) + 1) + p)
    return ids


def _groups_of_rows(inverse: np.ndarray) -> list[np.ndarray]:
    """Row indices of each code, from `_codes`' inverse (one argsort instead of a mask per code)."""
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds) if order.size else []


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a [wells, classes] matrix, got shape {scores.shape}")
    return scores


def class_groups(group_masks: np.ndarray) -> np.ndarray:
    """Group index per class (-1 for classes in no group, e.g. controls)."""
    group_masks = np.asarray(group_masks, dtype=bool)
    out = np.full(group_masks.shape[1], -1, dtype=np.int64)
    for g in range(group_masks.shape[0]):
        out[group_masks[g]] = g
    return out


def log_softmax(scores: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-softmax; -inf entries stay -inf (they are outside the candidate set).

    Pass `out=scores` to work in place (the submission builder does, to stay within memory).
    Rows without any finite entry stay all -inf.
    """
    scores = _check_scores(scores)
    if out is None:
        out = np.empty(scores.shape, dtype=np.result_type(scores.dtype, np.float32))
    for start in range(0, scores.shape[0], _CHUNK):
        block = scores[start:start + _CHUNK]
        top = block.max(axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0.0  # an all -inf row: keep it -inf instead of making NaNs
        shifted = np.subtract(block, top, dtype=out.dtype)
        total = np.exp(shifted).sum(axis=1, keepdims=True)
        total[total == 0] = 1.0  # the all -inf row again: log 1 = 0 leaves it at -inf
        np.subtract(shifted, np.log(total), out=out[start:start + _CHUNK])
    return out


def margins(scores: np.ndarray) -> np.ndarray:
    """Best minus second-best score per row (+inf with one candidate, NaN with none)."""
    scores = _check_scores(scores)
    if scores.shape[1] < 2:
        return np.full(scores.shape[0], np.inf)
    top2 = np.partition(scores, scores.shape[1] - 2, axis=1)[:, -2:]
    with np.errstate(invalid="ignore"):
        return (top2[:, 1] - top2[:, 0]).astype(np.float64)


# ---------------------------------------------------------------------------- group inference


def plate_group_scores(scores: np.ndarray, plate_index: np.ndarray, group_masks: np.ndarray,
                       method: str = "prob") -> np.ndarray:
    """[n_plates, n_groups] evidence that plate i (ids 0..n_plates-1) holds group g.

    - "prob":   sum over the plate's wells of the softmax probability mass on the group's classes
                (softmax over the classes of all groups: each well casts one vote, split by
                its confidence);
    - "argmax": number of the plate's wells whose best class lies in the group;
    - "mode":   mean over the plate's wells of the best score among the group's classes (for kNN
                votes searched per group: the summed weight of the weighted mode of the group's
                K nearest, the 41st place's evidence). A mean, as theirs: the plates of an
                experiment may hold different numbers of wells, and sums would weigh them by it.
    """
    scores = _check_scores(scores)
    group_masks = np.asarray(group_masks, dtype=bool)
    if method not in GROUP_METHODS:
        raise ValueError(f"unknown group method {method!r} (expected one of {', '.join(GROUP_METHODS)})")
    if group_masks.ndim != 2 or group_masks.shape[1] != scores.shape[1]:
        raise ValueError(f"group_masks must be [groups, {scores.shape[1]}], got {group_masks.shape}")
    if (group_masks.sum(axis=0) > 1).any():
        raise ValueError("plate groups must be disjoint")
    n_groups = group_masks.shape[0]
    # the classes of all groups, group after group: each group is then a contiguous run of columns
    sizes = group_masks.sum(axis=1)
    columns = np.concatenate([np.flatnonzero(m) for m in group_masks]) if n_groups else np.zeros(0, int)
    group_of_column = np.repeat(np.arange(n_groups), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    nonempty = sizes > 0
    dtype = np.result_type(scores.dtype, np.float32)
    mass = np.zeros((scores.shape[0], n_groups), dtype=np.float64)
    for start in range(0, scores.shape[0] if columns.size else 0, _CHUNK):
        block = scores[start:start + _CHUNK].take(columns, axis=1).astype(dtype, copy=False)
        rows = slice(start, start + len(block))
        if method == "argmax":
            mass[rows] = group_of_column[np.argmax(block, axis=1)][:, None] == np.arange(n_groups)
            continue
        if method == "mode":
            mass[rows, nonempty] = np.maximum.reduceat(block, starts[nonempty], axis=1)
            continue
        top = block.max(axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0.0
        np.subtract(block, top, out=block)
        np.exp(block, out=block)
        per_group = np.add.reduceat(block, starts[nonempty], axis=1)
        total = per_group.sum(axis=1, keepdims=True)
        total[total == 0] = 1.0  # a well with no finite score votes for nothing
        mass[rows, nonempty] = per_group / total
    n_plates = int(plate_index.max(initial=-1)) + 1
    table = np.zeros((n_plates, n_groups))
    for g in range(n_groups):
        table[:, g] = np.bincount(plate_index, weights=mass[:, g], minlength=n_plates)
    if method == "mode":
        table /= np.maximum(np.bincount(plate_index, minlength=n_plates), 1)[:, None]
    return table


def match_plates_to_groups(table: np.ndarray) -> np.ndarray:
    """Group per plate maximising the summed `table` with distinct groups (best ordering).

    One linear assignment on the plate x group matrix: the best of all orderings for any
    number of plates and groups. An experiment with fewer plates than groups leaves groups out;
    with more plates than groups, groups are reused as evenly as possible (columns repeated).
    """
    n_plates, n_groups = table.shape
    if n_plates == 0:
        return np.zeros(0, dtype=np.int64)
    if n_groups == 0:
        raise ValueError("no plate groups to choose from")
    copies = -(-n_plates // n_groups)
    rows, cols = _solver()(np.tile(table, (1, copies)), maximize=True)
    groups = np.empty(n_plates, dtype=np.int64)
    groups[rows] = cols % n_groups
    return groups


def infer_plate_groups(scores: np.ndarray, experiment_codes: np.ndarray, plate_codes: np.ndarray,
                       group_masks: np.ndarray, method: str = "prob") -> np.ndarray:
    """Group index per well: per experiment, the joint assignment of its plates to groups that
    best fits the scores (see `plate_group_scores` for `method`).

    `plate_codes` may be plate numbers (they are paired with the experiment) or global plate ids.
    """
    scores = _check_scores(scores)
    experiment_codes, plate_codes = np.asarray(experiment_codes), np.asarray(plate_codes)
    if not len(experiment_codes) == len(plate_codes) == scores.shape[0]:
        raise ValueError("scores, experiment_codes and plate_codes must have one entry per well")
    plate_index = plate_ids(experiment_codes, plate_codes)
    table = plate_group_scores(scores, plate_index, group_masks, method)
    # the experiment of each plate: plate ids sort by experiment first (see plate_ids)
    _, well_experiment = _codes(experiment_codes)
    plate_experiment = np.zeros(table.shape[0], dtype=np.int64)
    plate_experiment[plate_index] = well_experiment
    plate_group = np.empty(table.shape[0], dtype=np.int64)
    for members in _groups_of_rows(plate_experiment):
        plate_group[members] = match_plates_to_groups(table[members])
    return plate_group[plate_index]


# -------------------------------------------------------------------------------- class masks


def restrict_to_groups(scores: np.ndarray, well_groups: np.ndarray, group_masks: np.ndarray,
                       inplace: bool = False) -> np.ndarray:
    """Scores with the classes outside each well's group set to -inf (wells with group -1 untouched)."""
    scores = _check_scores(scores)
    well_groups = np.asarray(well_groups, dtype=np.int64)
    group_masks = np.asarray(group_masks, dtype=bool)
    if len(well_groups) != scores.shape[0]:
        raise ValueError("well_groups must have one entry per well")
    if group_masks.ndim != 2 or group_masks.shape[1] != scores.shape[1]:
        raise ValueError(f"group_masks must be [groups, {scores.shape[1]}], got {group_masks.shape}")
    if well_groups.size and (well_groups.min() < -1 or well_groups.max() >= group_masks.shape[0]):
        raise ValueError(f"well_groups must lie in -1..{group_masks.shape[0] - 1}")
    out = scores if inplace else scores.astype(np.result_type(scores.dtype, np.float32), copy=True)
    # row -1 of the extended masks keeps every class: wells without a group stay as they are
    outside = ~np.concatenate([group_masks, np.ones((1, scores.shape[1]), dtype=bool)])
    for start in range(0, scores.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        np.copyto(out[rows], -np.inf, where=outside[well_groups[rows]])
    return out


def split_by_group(scores: np.ndarray, well_groups: np.ndarray,
                   group_masks: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`restrict_to_groups` in compact form: per group, (rows, classes, scores[rows][:, classes]).

    The wells of a group only ever compete for its classes, so the per-plate work (log-softmax,
    assignment) can run on these [wells, group size] blocks instead of full-width rows that
    are mostly -inf. Wells with group -1 are in no block.
    """
    scores = _check_scores(scores)
    well_groups = np.asarray(well_groups, dtype=np.int64)
    group_masks = np.asarray(group_masks, dtype=bool)
    for g in range(group_masks.shape[0]):
        rows = np.flatnonzero(well_groups == g)
        classes = np.flatnonzero(group_masks[g])
        if rows.size:
            yield rows, classes, scores[np.ix_(rows, classes)]


def exclude_classes(scores: np.ndarray, plate_codes: np.ndarray,
                    taken: Mapping[object, Iterable[int]], inplace: bool = False) -> np.ndarray:
    """Scores with the classes in `taken[plate]` set to -inf on every well of that plate.

    For pseudo-labelling: a class already labelled on a plate cannot be in another of its wells.
    """
    scores = _check_scores(scores)
    out = scores if inplace else scores.astype(np.result_type(scores.dtype, np.float32), copy=True)
    uniques, inverse = _codes(plate_codes)
    for code, rows in zip(uniques, _groups_of_rows(inverse)):
        classes = taken.get(code.item() if isinstance(code, np.generic) else code)
        if classes is None:
            continue
        classes = np.fromiter(classes, dtype=np.int64)
        if classes.size:
            out[np.ix_(rows, classes)] = -np.inf
    return out


# ------------------------------------------------------------------------- per-plate balancing


def balance_plates(log_probs: np.ndarray, plate_codes: np.ndarray, method: str, iterations: int = 1000,
                   tolerance: float = 1e-9) -> tuple[np.ndarray, float]:
    """Each plate's probabilities balanced before the assignment: (their logs, the largest
    remaining difference between a class's summed probability and its target).

    `log_probs`: per-well log-probabilities over a plate group's classes (rows sum to 1; -inf: not
    a candidate). A plate of n wells and c candidate classes holds each class at most once, so
    over its wells a class should carry n/c of the probability mass:
    - "columns" (the 4th place): each class's probabilities divided by their sum over the
      plate's wells and scaled to n/c (rows no longer sum to 1);
    - "sinkhorn" (the 7th place's iterative division by column sums and row sums): up to
      `iterations` rounds of columns to n/c, then rows to 1, stopping once every column is
      within `tolerance` of n/c (rows end exact).
    A class whose probabilities all underflow to 0 on a plate keeps them (it cannot be scaled).
    On logs a column or row constant shifts every assignment of a complete plate equally: the
    balancing changes the per-plate assignment of log-probabilities only where a plate has fewer
    wells than classes, while the per-well choice and an assignment of probabilities change.
    """
    if method not in BALANCES:
        raise ValueError(f"unknown balance {method!r} (choose from {', '.join(BALANCES)})")
    scores = _check_scores(log_probs)
    out = np.empty(scores.shape, dtype=np.float64)
    worst = 0.0
    _, inverse = _codes(plate_codes)
    for rows in _groups_of_rows(inverse):
        p = np.exp(scores[rows].astype(np.float64))
        target = len(rows) / max(int(np.isfinite(scores[rows]).any(axis=0).sum()), 1)
        for _ in range(iterations if method == "sinkhorn" else 1):
            columns = p.sum(axis=0)
            p *= np.divide(target, columns, out=np.ones_like(columns), where=columns > 0)
            if method == "columns":
                break
            p /= p.sum(axis=1, keepdims=True)
            columns = p.sum(axis=0)
            if np.abs(columns[columns > 0] - target).max(initial=0.0) <= tolerance:
                break
        columns = p.sum(axis=0)
        worst = max(worst, float(np.abs(columns[columns > 0] - target).max(initial=0.0)))
        with np.errstate(divide="ignore"):
            out[rows] = np.log(p)
    return out, worst


# ------------------------------------------------------------------------- per-plate matching


def _assign_one(block: np.ndarray) -> np.ndarray:
    """Matching of one plate's rows to columns maximising the total score; -1 = unassigned."""
    labels = np.full(block.shape[0], -1, dtype=np.int64)
    finite = np.isfinite(block)
    if finite.all():  # the usual case (compact blocks): nothing forbidden, no bookkeeping
        r, c = _solver()(block.astype(np.float64), maximize=True)
        labels[r] = c
        return labels
    rows = np.flatnonzero(finite.any(axis=1))
    cols = np.flatnonzero(finite.any(axis=0))
    if rows.size == 0:
        return labels
    sub = block[np.ix_(rows, cols)].astype(np.float64)
    ok = finite[np.ix_(rows, cols)]
    lo, hi = sub[ok].min(), sub[ok].max()
    # A forbidden pair must cost more than any gain elsewhere, so the solver first maximises the
    # number of allowed pairs and only then their score; forbidden pairs it still has to use are
    # dropped below.
    sub[~ok] = lo - (hi - lo + 1.0) * (rows.size + 1)
    r, c = _solver()(sub, maximize=True)
    keep = ok[r, c]
    labels[rows[r[keep]]] = cols[c[keep]]
    return labels


def assign_plates(scores: np.ndarray, plate_codes: np.ndarray,
                  fill_unassigned: bool = False) -> np.ndarray:
    """Class per well: per plate, each class to at most one well, maximising the total score.

    Only finite scores are candidates. A plate with fewer wells than classes leaves classes out;
    wells that cannot get a distinct class (more wells than candidate classes, or no finite
    score) get -1, or with `fill_unassigned` their best finite class (repeating one).
    `plate_codes` must identify plates uniquely across experiments (see `plate_ids`).
    """
    scores = _check_scores(scores)
    plate_codes = np.asarray(plate_codes)
    if len(plate_codes) != scores.shape[0]:
        raise ValueError("plate_codes must have one entry per well")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    labels = np.full(scores.shape[0], -1, dtype=np.int64)
    _, inverse = _codes(plate_codes)
    for rows in _groups_of_rows(inverse):
        labels[rows] = _assign_one(scores[rows])
    if fill_unassigned:
        missing = np.flatnonzero(labels < 0)
        if missing.size:
            block = scores[missing]
            best = np.argmax(block, axis=1)
            labels[missing] = np.where(np.isfinite(block[np.arange(missing.size), best]), best, -1)
    return labels
