"""k-nearest-neighbour classification of wells on embeddings, per cell type (the 41st-place recipe).

    scores = knn_scores(query, query_cells, reference, reference_cells, reference_labels,
                        k={"HEPG2": 30, "HUVEC": 100, ...}, n_classes=..., candidates=treatment,
                        reference_groups=group_of_each_reference, weight="sigmoid")

Each query well (one unit-length vector: its sites averaged, then L2-normalised) is compared with
the reference wells *of its own cell type* only, as the 41st place did: the cell types differ so
much that a neighbour from another one says more about its look than about its siRNA.

Search (methods.KNN_SEARCHES). "group", the 41st place's: the K nearest are found among the reference wells
of each plate group separately, so every well gets K votes inside every group; a class's score
is the summed votes of the K nearest of its own group, and the largest score within a group (the
weighted mode of those K) is the well's evidence for that group (plates.py, method "mode").
"cell": the K nearest of the whole cell type, so a group only gets the votes that happen to fall
in it. Brute force by cosine similarity (one normalised matrix product per row block for all
groups, then np.argpartition over each group's columns); exact, and trees do not help in ~1000
dimensions.

Votes (WEIGHTS). "sigmoid": sigmoid(cosine), the 41st place's (every neighbour votes between
0.27 and 0.73, nearly uniform); "relu-cos": max(cosine, 0), a closer neighbour counts more and an
anti-correlated one not at all. Raw summed votes, not log-shares: 0 for candidates no neighbour
voted for (still possible for the per-plate assignment), -inf for non-candidates; log-shares make
the assignment avoid unvoted classes at any cost (lost 1.5-4 points, benchmarks/RESULTS.md).

Several files: `average` (the 41st place averaged its models' embeddings) or `concatenate`.
Pure numpy; make_submission.py (--knn) turns files into these arrays and runs the plate stages.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cellpaint.core.errors import InputError, UsageError
from cellpaint.core.settings import KNN_WEIGHTS as WEIGHTS
_BLOCK_BYTES = 32 << 20  # similarity block [rows, references] per step: bounds the temporaries
_MAX_ROWS = 2048


class KnnError(InputError, ValueError):
    """Embeddings that cannot be scored by their neighbours (no reference wells of a cell type or
    plate group, vectors of other sizes); the message says what is missing."""


class KnnFlagError(UsageError, ValueError):
    """A --knn or --knn-weight value that cannot work with this data; the message says what to change."""


def parse_k(text: str, cell_types: Sequence[str]) -> dict[str, int]:
    """K per cell type from 'K' (all), 'K1,K2,...' (sorted cell-type order) or 'TYPE=K,...'."""
    cell_types = sorted(cell_types)
    items = [item.strip() for item in str(text).split(",")]
    listed = ", ".join(cell_types)

    def as_k(value: str, where: str) -> int:
        try:
            k = int(value)
        except ValueError:
            raise KnnFlagError(f"--knn {text!r}: {value!r} is not an integer{where}") from None
        if k < 1:
            raise KnnFlagError(f"--knn {text!r}: K must be at least 1{where}, got {k}")
        return k

    named = ["=" in item for item in items]
    if any(named):
        if not all(named):
            raise KnnFlagError(f"--knn {text!r}: give every K as TYPE=K or none (cell types: {listed})")
        ks: dict[str, int] = {}
        for item in items:
            name, value = (part.strip() for part in item.split("=", 1))
            if name not in cell_types:
                raise KnnFlagError(f"--knn {text!r}: unknown cell type {name!r} (the metadata has {listed})")
            if name in ks:
                raise KnnFlagError(f"--knn {text!r}: cell type {name} given twice")
            ks[name] = as_k(value, f" for {name}")
        missing = [c for c in cell_types if c not in ks]
        if missing:
            raise KnnFlagError(f"--knn {text!r} gives no K for {', '.join(missing)} (cell types: {listed})")
        return ks
    if len(items) == 1:
        k = as_k(items[0], "")
        return {c: k for c in cell_types}
    if len(items) != len(cell_types):
        raise KnnFlagError(f"--knn {text!r} gives {len(items)} values for {len(cell_types)} cell types "
                       f"(one K for all, or one each in this order: {listed}; or TYPE=K,...)")
    return {c: as_k(v, f" for {c}") for c, v in zip(cell_types, items)}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in place; all-zero rows stay zero (similarity 0 to everything)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no [rows, dim] temporary
    norms[norms == 0] = 1.0
    x /= norms[:, None].astype(x.dtype, copy=False)
    return x


def average(blocks: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of several files' raw (not yet normalised) vectors of one width, as unit rows.

    The 41st place averaged its models' embeddings before the cosine search; that assumes the
    models' feature axes correspond (e.g. fine-tuned from one parent), which concatenation does not.
    """
    total = float(sum(weights))
    out = np.zeros(blocks[0].shape, dtype=np.float32)
    for block, weight in zip(blocks, weights):
        if weight > 0:  # weight 0 drops the file
            out += block * np.float32(weight / total)
    return l2_normalise(out)


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


def center_by_group(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rows with the mean row of their group subtracted, in place (--knn-center plate, the 2nd place:
    what a plate shares, its batch effect among it, is taken out before the cosine search).
    Normalise again afterwards: centred rows are no longer unit length."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse).astype(np.float64)
    sums = np.zeros((len(counts), x.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, x)
    x -= (sums / counts[:, None]).astype(x.dtype)[inverse]
    return x


def neighbour_weights(sim: np.ndarray, weight: str) -> np.ndarray:
    """The vote of each neighbour from its cosine similarity (see WEIGHTS)."""
    if weight == "sigmoid":
        return np.float32(1) / (np.float32(1) + np.exp(-sim))
    if weight != "relu-cos":
        raise KnnFlagError(f"--knn-weight {weight!r}: expected one of {', '.join(WEIGHTS)}")
    out = np.maximum(sim, 0)
    # a row whose neighbours all point away: let them vote equally rather than not at all
    out[out.sum(axis=1) == 0] = 1
    return out


def _vote(query: np.ndarray, reference: np.ndarray, labels: np.ndarray, segments: Sequence[tuple[int, int, int]],
          weight: str, out: np.ndarray, rows: np.ndarray) -> None:
    """Add to out[rows[i]] the weighted votes of query row i's k nearest reference rows, searched
    separately in each segment (start, stop, k) of the reference columns."""
    step = int(max(1, min(_MAX_ROWS, _BLOCK_BYTES // (4 * len(reference)))))
    for start in range(0, len(query), step):
        # one similarity block for all segments: the matrix product is the expensive part
        block = query[start:start + step] @ reference.T  # cosine: both sides are unit rows
        target = rows[start:start + len(block), None]
        for a, b, k in segments:
            sim = block[:, a:b]
            if k < b - a:
                top = np.argpartition(sim, b - a - k, axis=1)[:, -k:]  # unordered top k
                sim = np.take_along_axis(sim, top, axis=1)
            else:
                top = np.broadcast_to(np.arange(b - a), sim.shape)
            np.add.at(out, (np.broadcast_to(target, top.shape), labels[a:b][top]),
                      neighbour_weights(sim, weight).astype(out.dtype, copy=False))


def knn_scores(query: np.ndarray, query_cells: np.ndarray, reference: np.ndarray,
               reference_cells: np.ndarray, reference_labels: np.ndarray, k: Mapping[str, int],
               n_classes: int, candidates: np.ndarray, reference_groups: np.ndarray | None = None,
               weight: str = "sigmoid", out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Class scores of the query wells from their k nearest reference wells of the same cell type.

    query / reference: float32 unit rows [wells, dim]; *_cells: the cell type of each row;
    reference_labels: class per reference row (must be among `candidates`, the classes a query
    well may get). reference_groups: the plate group of each reference row's class: the K
    nearest are then found among each group's reference wells separately (the 41st place's
    search), so a class's score counts the K nearest *of its group*; None searches the whole
    cell type at once. weight: the vote of a neighbour, see WEIGHTS.
    Returns float32 [query wells, n_classes] summed votes (-inf outside `candidates`) and the K
    used per cell type: an int when every searched set had K wells, otherwise {group: K used}
    (at most the set's size).
    `out`: a float32 [query wells, n_classes] array to fill instead of a new one.
    """
    query_cells, reference_cells = np.asarray(query_cells), np.asarray(reference_cells)
    reference_labels = np.asarray(reference_labels, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    if weight not in WEIGHTS:
        raise KnnFlagError(f"--knn-weight {weight!r}: expected one of {', '.join(WEIGHTS)}")
    if query.shape[1:] != reference.shape[1:]:
        raise KnnError(f"query and reference vectors differ in size: {query.shape[1:]} vs {reference.shape[1:]}")
    if not np.isin(reference_labels, candidates).all():
        raise KnnError("reference wells must be labelled with candidate classes")
    if reference_groups is not None:
        reference_groups = np.asarray(reference_groups, dtype=np.int64)
        if reference_groups.shape != reference_labels.shape or (reference_groups < 0).any():
            raise KnnError("every reference well needs the plate group of its class")
        n_groups = int(reference_groups.max(initial=-1)) + 1
    if out is None:
        out = np.zeros((len(query), n_classes), dtype=np.float32)
    elif out.shape != (len(query), n_classes) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(len(query), n_classes)}, got {out.dtype} {out.shape}")
    else:
        out.fill(0)
    used: dict = {}
    for cell in np.unique(query_cells).tolist():
        if cell not in k:
            raise KnnError(f"no K given for cell type {cell}")
        q = np.flatnonzero(query_cells == cell)
        r = np.flatnonzero(reference_cells == cell)
        if r.size == 0:
            raise KnnError(f"no reference wells of cell type {cell} for its {q.size} well(s) to compare with")
        want = int(k[cell])
        if reference_groups is None:
            segments = [(0, r.size, min(want, r.size))]
        else:
            # the cell type's references group after group: each group is a contiguous column range
            r = r[np.argsort(reference_groups[r], kind="stable")]
            sizes = np.bincount(reference_groups[r], minlength=n_groups)
            if (sizes == 0).any():
                raise KnnError(f"no reference wells of plate group {int(np.argmin(sizes))} among the {cell} "
                               "wells: a group-wise search needs every group (use --knn-search cell)")
            ends = np.cumsum(sizes)
            segments = [(int(e - n), int(e), int(min(want, n))) for e, n in zip(ends, sizes)]
        ks = [s[2] for s in segments]
        used[cell] = ks[0] if len(set(ks)) == 1 else {g: kg for g, kg in enumerate(ks)}
        # one cell type at a time: its rows are copied together once, then read block by block
        _vote(query[q], reference[r], reference_labels[r], segments, weight, out, q)
    outside = np.ones(n_classes, dtype=bool)
    outside[candidates] = False
    out[:, outside] = -np.inf  # a few columns (controls): no vote can land there
    return out, used
