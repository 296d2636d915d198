"""k-nearest-neighbour classification of wells on embeddings, per cell type (the 41st-place recipe).

    scores = knn_scores(query, query_cells, reference, reference_cells, reference_labels,
                        k={"HEPG2": 30, "HUVEC": 100, ...}, n_classes=..., candidates=treatment)

Each query well (one unit-length vector: its sites averaged, then L2-normalised) is compared with
the reference wells *of its own cell type* only, as the 41st place did: the cell types differ so
much that a neighbour from another one says more about its look than about its siRNA. Its K
nearest by cosine similarity (a normalised matrix product and np.argpartition, in row blocks so
memory stays bounded; brute force is exact, and trees do not help in ~1000 dimensions)
vote for their labels, each with weight max(similarity, 0): a closer neighbour counts more, an
anti-correlated one not at all (uniform votes lost 1.5-4 points of accuracy on planted data,
benchmarks/RESULTS.md). A class's score is its summed votes: 0 for candidates no neighbour voted
for (still possible for the per-plate assignment), -inf for non-candidates.

Raw sums, not the logarithm of vote shares: the assignment maximises a plate's summed score, and
log-shares make it avoid unvoted classes at any cost, which lost 1.5-4 points after the assignment
on planted data (vote shares did as well as raw sums; group inference was the same for all).

Pure numpy; make_submission.py (--knn) turns files into these arrays and runs the plate stages.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

_BLOCK_BYTES = 32 << 20  # similarity block [rows, references] per step: bounds the temporaries
_MAX_ROWS = 2048


class KnnError(ValueError):
    """A bad --knn setting or reference set; the message says what to change."""


def parse_k(text: str, cell_types: Sequence[str]) -> dict[str, int]:
    """K per cell type from 'K' (all), 'K1,K2,...' (sorted cell-type order) or 'TYPE=K,...'."""
    cell_types = sorted(cell_types)
    items = [item.strip() for item in str(text).split(",")]
    listed = ", ".join(cell_types)

    def as_k(value: str, where: str) -> int:
        try:
            k = int(value)
        except ValueError:
            raise KnnError(f"--knn {text!r}: {value!r} is not an integer{where}") from None
        if k < 1:
            raise KnnError(f"--knn {text!r}: K must be at least 1{where}, got {k}")
        return k

    named = ["=" in item for item in items]
    if any(named):
        if not all(named):
            raise KnnError(f"--knn {text!r}: give every K as TYPE=K or none (cell types: {listed})")
        ks: dict[str, int] = {}
        for item in items:
            name, value = (part.strip() for part in item.split("=", 1))
            if name not in cell_types:
                raise KnnError(f"--knn {text!r}: unknown cell type {name!r} (the metadata has {listed})")
            if name in ks:
                raise KnnError(f"--knn {text!r}: cell type {name} given twice")
            ks[name] = as_k(value, f" for {name}")
        missing = [c for c in cell_types if c not in ks]
        if missing:
            raise KnnError(f"--knn {text!r} gives no K for {', '.join(missing)} (cell types: {listed})")
        return ks
    if len(items) == 1:
        k = as_k(items[0], "")
        return {c: k for c in cell_types}
    if len(items) != len(cell_types):
        raise KnnError(f"--knn {text!r} gives {len(items)} values for {len(cell_types)} cell types "
                       f"(one K for all, or one each in this order: {listed}; or TYPE=K,...)")
    return {c: as_k(v, f" for {c}") for c, v in zip(cell_types, items)}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in place; all-zero rows stay zero (similarity 0 to everything)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no [rows, dim] temporary
    norms[norms == 0] = 1.0
    x /= norms[:, None].astype(x.dtype, copy=False)
    return x


def concatenate(blocks: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Unit rows of several files side by side, block i scaled by sqrt(w_i / sum w).

    The cosine similarity of two such rows is then the weighted mean of the files' own cosine
    similarities, and the rows stay unit length. Concatenated rather than averaged: two models'
    embedding spaces are not aligned (another seed is an arbitrary rotation of the features) and
    need not even have the same size, so an average of their vectors would mean nothing.
    """
    total = float(sum(weights))
    used = [(b, w) for b, w in zip(blocks, weights) if w > 0]  # weight 0 drops the file
    out = np.empty((used[0][0].shape[0], sum(b.shape[1] for b, _ in used)), dtype=np.float32)
    start = 0
    for block, weight in used:
        np.multiply(block, np.float32(np.sqrt(weight / total)), out=out[:, start:start + block.shape[1]])
        start += block.shape[1]
    return out


def _vote(query: np.ndarray, reference: np.ndarray, labels: np.ndarray, k: int,
          out: np.ndarray, rows: np.ndarray) -> None:
    """Add to out[rows[i]] the weighted votes of query row i's k nearest reference rows."""
    k = min(k, len(reference))
    step = int(max(1, min(_MAX_ROWS, _BLOCK_BYTES // (4 * len(reference)))))
    for start in range(0, len(query), step):
        sim = query[start:start + step] @ reference.T  # cosine: both sides are unit rows
        if k < sim.shape[1]:
            top = np.argpartition(sim, sim.shape[1] - k, axis=1)[:, -k:]  # unordered top k
            sim = np.take_along_axis(sim, top, axis=1)
        else:
            top = np.broadcast_to(np.arange(sim.shape[1]), sim.shape)
        weight = np.maximum(sim, 0)
        # a row whose neighbours all point away: let them vote equally rather than not at all
        weight[weight.sum(axis=1) == 0] = 1
        target = np.broadcast_to(rows[start:start + len(sim), None], top.shape)
        np.add.at(out, (target, labels[top]), weight.astype(out.dtype, copy=False))


def knn_scores(query: np.ndarray, query_cells: np.ndarray, reference: np.ndarray,
               reference_cells: np.ndarray, reference_labels: np.ndarray, k: Mapping[str, int],
               n_classes: int, candidates: np.ndarray,
               out: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Class scores of the query wells from their k nearest reference wells of the same cell type.

    query / reference: float32 unit rows [wells, dim]; *_cells: the cell type of each row;
    reference_labels: class per reference row (must be among `candidates`, the classes a query
    well may get). Returns float32 [query wells, n_classes] summed votes (-inf outside
    `candidates`) and the K used per cell type (at most the number of its reference wells).
    `out`: a float32 [query wells, n_classes] array to fill instead of a new one.
    """
    query_cells, reference_cells = np.asarray(query_cells), np.asarray(reference_cells)
    reference_labels = np.asarray(reference_labels, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    if query.shape[1:] != reference.shape[1:]:
        raise KnnError(f"query and reference vectors differ in size: {query.shape[1:]} vs {reference.shape[1:]}")
    if not np.isin(reference_labels, candidates).all():
        raise KnnError("reference wells must be labelled with candidate classes")
    if out is None:
        out = np.zeros((len(query), n_classes), dtype=np.float32)
    elif out.shape != (len(query), n_classes) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(len(query), n_classes)}, got {out.dtype} {out.shape}")
    else:
        out.fill(0)
    used: dict[str, int] = {}
    for cell in np.unique(query_cells).tolist():
        if cell not in k:
            raise KnnError(f"no K given for cell type {cell}")
        q = np.flatnonzero(query_cells == cell)
        r = np.flatnonzero(reference_cells == cell)
        if r.size == 0:
            raise KnnError(f"no reference wells of cell type {cell} for its {q.size} well(s) to compare with")
        used[cell] = min(int(k[cell]), int(r.size))
        # one cell type at a time: its rows are copied together once, then read block by block
        _vote(query[q], reference[r], reference_labels[r], used[cell], out, q)
    outside = np.ones(n_classes, dtype=bool)
    outside[candidates] = False
    out[:, outside] = -np.inf  # a few columns (controls): no vote can land there
    return out, used
