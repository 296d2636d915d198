"""Sizes of the real test set (~20,000 wells) on the row-blocked code paths, and logits of ~1000.

plates.py and knn.py work through their rows in blocks (a few thousand rows, to bound the
temporaries), so every size below one block tests only the first block. These run a little
over two blocks (few columns, so they stay cheap) and compare with the same quantity computed
in one piece here, in float64. Logits of ~1000 would overflow exp() without the max shift of
the log-softmax; the answers must equal those of the same logits shifted down.
"""
from __future__ import annotations

import numpy as np
import pytest

from cellpaint.data import plates
from cellpaint.modes import knn

ROWS = 9000  # > 2 blocks of plates' 4096 rows and > 4 of knn's 2048: every block boundary is crossed


def reference_log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64; a row without any finite entry stays all -inf."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape, -np.inf)
    live = np.isfinite(x).any(axis=1)
    top = x[live].max(axis=1, keepdims=True)
    out[live] = x[live] - top - np.log(np.exp(x[live] - top).sum(axis=1, keepdims=True))
    return out


def scores_with_holes(rows: int = ROWS, classes: int = 7, seed: int = 0) -> np.ndarray:
    """Random scores with -inf entries and a few all -inf rows, some in every block."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, (rows, classes))
    x[rng.random((rows, classes)) < 0.2] = -np.inf
    x[[5, 4100, 8500]] = -np.inf
    return x


def test_log_softmax_over_several_blocks_equals_the_one_piece_formula():
    x = scores_with_holes()
    out = plates.log_softmax(x)
    expected = reference_log_softmax(x)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert np.isneginf(out[[5, 4100, 8500]]).all()
    inplace = x.copy()
    assert plates.log_softmax(inplace, out=inplace) is inplace
    np.testing.assert_allclose(inplace, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_of_logits_near_1000_is_that_of_the_shifted_logits(dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (ROWS, 5))
    x[rng.random(x.shape) < 0.1] = -np.inf
    big = (x + 1000).astype(dtype)  # exp(1000) overflows any float
    out = plates.log_softmax(big)
    assert out.dtype == dtype and not np.isnan(out).any()
    assert (np.isneginf(out) == np.isneginf(x)).all()
    # float32 holds ~1000 to 6e-5: the shift is exact only up to that
    np.testing.assert_allclose(out, reference_log_softmax(x), atol=2e-4 if dtype == np.float32 else 1e-9)
    low = np.where(np.isneginf(x), -np.inf, x - 1000)  # and exp(-1000) underflows to 0
    np.testing.assert_allclose(plates.log_softmax(low), reference_log_softmax(x), atol=1e-9)


def plate_layout(rows: int = ROWS, n_plates: int = 7, seed: int = 2) -> np.ndarray:
    """Plate ids whose wells are spread over all blocks."""
    return np.random.default_rng(seed).integers(0, n_plates, rows)


MASKS = np.array([[1, 1, 0, 0, 0, 0, 0, 0],
                  [0, 0, 1, 1, 1, 0, 0, 0],
                  [0, 0, 0, 0, 0, 1, 0, 0],
                  [0, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)  # an empty group; classes 6, 7 in none


def expected_group_table(scores: np.ndarray, plate: np.ndarray, method: str) -> np.ndarray:
    """plate_group_scores' definition, row by row over all rows at once."""
    n_plates, n_groups = plate.max() + 1, len(MASKS)
    in_groups = MASKS.any(0)
    per_well = np.zeros((len(scores), n_groups))
    if method == "prob":
        p = np.exp(reference_log_softmax(np.where(in_groups, scores, -np.inf)))
        p = np.nan_to_num(p)
        per_well = p @ MASKS.T.astype(float)
    elif method == "argmax":
        columns = np.flatnonzero(in_groups)
        best = columns[np.argmax(scores[:, columns], axis=1)]
        per_well = MASKS[:, best].T.astype(float)
    else:
        for g, m in enumerate(MASKS):
            if m.any():
                per_well[:, g] = scores[:, m].max(1)
    table = np.zeros((n_plates, n_groups))
    np.add.at(table, plate, per_well)
    if method == "mode":
        table /= np.bincount(plate, minlength=n_plates)[:, None]
    return table


@pytest.mark.parametrize("method", ["prob", "argmax", "mode"])
@pytest.mark.parametrize("shift", [0.0, 1000.0])
def test_plate_group_scores_over_several_blocks_and_near_1000(method, shift):
    rng = np.random.default_rng(3)
    scores = rng.normal(0, 2, (ROWS, MASKS.shape[1]))
    plate = plate_layout()
    table = plates.plate_group_scores(scores + shift, plate, MASKS, method)
    expected = expected_group_table(scores, plate, method)
    if method == "mode":
        expected[:, :3] += shift
    np.testing.assert_allclose(table, expected, rtol=1e-9, atol=1e-6)
    if method != "mode":  # one vote per well: the plate's well count in all
        np.testing.assert_allclose(table.sum(1), np.bincount(plate), rtol=1e-9)


def test_restrict_to_groups_over_several_blocks():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(ROWS, MASKS.shape[1])).astype(np.float32)
    groups = rng.integers(-1, 3, ROWS)
    out = plates.restrict_to_groups(scores, groups, MASKS)
    expected = np.where(np.vstack([MASKS, np.ones((1, 8), bool)])[groups], scores, -np.inf)
    np.testing.assert_array_equal(out, expected)
    plates.restrict_to_groups(scores, groups, MASKS, inplace=True)
    np.testing.assert_array_equal(scores, expected)


def test_group_inference_and_assignment_on_many_wells():
    """~20,000 wells in 4 plate groups: inference and assignment on blocked sizes find the plant."""
    rng = np.random.default_rng(5)
    n_groups, group_size, n_experiments = 4, 40, 32  # 5,120 wells over 128 plates
    n_classes = n_groups * group_size
    masks = np.zeros((n_groups, n_classes), bool)
    for g in range(n_groups):
        masks[g, g * group_size:(g + 1) * group_size] = True
    experiment, plate, truth_group, truth = [], [], [], []
    for e in range(n_experiments):
        for p, g in enumerate(rng.permutation(n_groups)):
            labels = rng.permutation(np.flatnonzero(masks[g]))
            experiment += [e] * group_size
            plate += [p + 1] * group_size
            truth_group += [g] * group_size
            truth += labels.tolist()
    truth = np.array(truth)
    scores = rng.normal(0, 1, (len(truth), n_classes)) + 1000
    scores[np.arange(len(truth)), truth] += 12  # far above the noise: the plant is the one optimum
    groups = plates.infer_plate_groups(scores, np.array(experiment), np.array(plate), masks)
    np.testing.assert_array_equal(groups, truth_group)
    restricted = plates.log_softmax(plates.restrict_to_groups(scores, groups, masks))
    ids = plates.plate_ids(np.array(experiment), np.array(plate))
    labels = plates.assign_plates(restricted, ids)
    np.testing.assert_array_equal(labels, truth)


@pytest.mark.parametrize("weight", ["sigmoid", "relu-cos"])
@pytest.mark.parametrize("grouped", [False, True])
def test_knn_scores_over_several_blocks_equal_the_one_piece_vote(weight, grouped):
    """9,000 query wells (knn votes 2,048 rows at a time) against 60 references of two cell types."""
    rng = np.random.default_rng(6)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    query, reference = unit(rng.normal(size=(ROWS, 3))), unit(rng.normal(size=(60, 3)))
    query_cells = rng.choice(["A", "B"], ROWS)
    reference_cells = np.repeat(["A", "B"], 30)
    labels = rng.integers(0, 6, 60)  # classes 0..5 are candidates; 6 is a control
    groups = labels // 3  # two plate groups: 0, 1, 2 and 3, 4, 5
    k = {"A": 4, "B": 7}
    scores, used = knn.knn_scores(query, query_cells, reference, reference_cells, labels, k, n_classes=7,
                                  candidates=np.arange(6), reference_groups=groups if grouped else None,
                                  weight=weight)
    expected = np.zeros((ROWS, 7))
    for cell in "AB":
        q = np.flatnonzero(query_cells == cell)
        r = np.flatnonzero(reference_cells == cell)
        sim = query[q].astype(np.float64) @ reference[r].T.astype(np.float64)
        searched = [r] if not grouped else [r[groups[r] == g] for g in (0, 1)]
        for members in searched:
            cols = np.searchsorted(r, members)
            nearest = np.argsort(-sim[:, cols], axis=1)[:, :k[cell]]
            s = np.take_along_axis(sim[:, cols], nearest, 1)
            if weight == "sigmoid":
                votes = 1 / (1 + np.exp(-s))
            else:
                votes = np.maximum(s, 0)
                votes[votes.sum(1) == 0] = 1
            np.add.at(expected, (q[:, None], labels[members][nearest]), votes)
    expected[:, 6] = -np.inf
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert used == k
