"""plates.balance_plates (make_submission --balance) at its edges, against a few lines of numpy:
classes that are no candidate on a plate, a class whose probabilities all underflow, plates in any
row order, one round against many, the stopping tolerance, the largest remaining error over the
plates, and the refusal of an unknown method."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from cellpaint.data import plates


def log_probs(rng, n: int, classes: int, scale: float = 2.0) -> np.ndarray:
    return plates.log_softmax(rng.normal(size=(n, classes)) * scale)


def sinkhorn(p: np.ndarray, target: float, rounds: int) -> np.ndarray:
    """The reference: columns to the target, then rows to 1, `rounds` times (no early stop)."""
    p = p.copy()
    for _ in range(rounds):
        p *= target / p.sum(axis=0)
        p /= p.sum(axis=1, keepdims=True)
    return p


def test_columns_and_sinkhorn_against_their_formulas():
    rng = np.random.default_rng(0)
    log_p = log_probs(rng, 7, 5)  # 7 wells, 5 classes: each class 7/5 of the mass
    plate = np.zeros(7, dtype=np.int64)
    columns, error = plates.balance_plates(log_p, plate, "columns")
    p = np.exp(log_p)
    np.testing.assert_allclose(np.exp(columns), p * (7 / 5) / p.sum(axis=0), rtol=1e-12)
    assert error == pytest.approx(0.0, abs=1e-12) and columns.dtype == np.float64
    for rounds in (1, 3):
        balanced, _ = plates.balance_plates(log_p, plate, "sinkhorn", iterations=rounds, tolerance=0.0)
        np.testing.assert_allclose(np.exp(balanced), sinkhorn(p, 7 / 5, rounds), rtol=1e-12)


def test_the_error_is_the_largest_column_miss_over_the_plates():
    rng = np.random.default_rng(1)
    log_p = np.concatenate([log_probs(rng, 6, 4, 0.1), log_probs(rng, 5, 4, 4.0)])  # an easy and a hard plate
    plate = np.repeat([0, 1], [6, 5])
    balanced, error = plates.balance_plates(log_p, plate, "sinkhorn", iterations=1, tolerance=0.0)
    misses = [np.abs(np.exp(balanced[plate == k]).sum(axis=0) - n / 4).max() for k, n in ((0, 6), (1, 5))]
    assert error == pytest.approx(max(misses), rel=1e-9) and misses[1] > misses[0] > 0
    # more rounds get closer; the loop stops once every column is within the tolerance
    _, closer = plates.balance_plates(log_p, plate, "sinkhorn", iterations=5, tolerance=0.0)
    assert closer < error
    _, stopped = plates.balance_plates(log_p, plate, "sinkhorn", iterations=1000, tolerance=1e-3)
    _, done = plates.balance_plates(log_p, plate, "sinkhorn", iterations=1000, tolerance=1e-12)
    assert 1e-12 < stopped <= 1e-3 and done <= 1e-12


def test_plates_are_balanced_alone_in_any_row_order():
    rng = np.random.default_rng(2)
    a, b = log_probs(rng, 4, 3), log_probs(rng, 6, 3)
    alone_a, _ = plates.balance_plates(a, np.zeros(4), "sinkhorn")
    alone_b, _ = plates.balance_plates(b, np.zeros(6), "sinkhorn")
    mixed = np.concatenate([a, b])[[0, 4, 1, 5, 6, 2, 7, 8, 3, 9]]
    codes = np.array(["p", "q", "p", "q", "q", "p", "q", "q", "p", "q"])
    together, _ = plates.balance_plates(mixed, codes, "sinkhorn")
    np.testing.assert_allclose(together[codes == "p"], alone_a, rtol=1e-12)
    np.testing.assert_allclose(together[codes == "q"], alone_b, rtol=1e-12)


def test_classes_that_are_no_candidate_stay_out_and_do_not_count():
    rng = np.random.default_rng(3)
    log_p = log_probs(rng, 6, 4)
    log_p[:, 3] = -np.inf  # not a candidate on this plate: 3 classes share 6 wells, 2 each
    log_p = log_p - np.logaddexp.reduce(log_p, axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) warning for the class left out
        balanced, error = plates.balance_plates(log_p, np.zeros(6), "sinkhorn")
    assert (balanced[:, 3] == -np.inf).all() and error <= 1e-9
    np.testing.assert_allclose(np.exp(balanced[:, :3]).sum(axis=0), [2, 2, 2], atol=1e-9)
    # a class whose probabilities all underflow to 0 keeps them: it cannot be scaled
    tiny = log_p.copy()
    tiny[:, 0] = -1e4
    columns, _ = plates.balance_plates(tiny, np.zeros(6), "columns")
    assert (columns[:, 0] == -np.inf).all() and np.isfinite(columns[:, 1:3]).all()


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="^" + re.escape("unknown balance 'rows' (choose from sinkhorn, columns)") + "$"):
        plates.balance_plates(np.zeros((2, 2)), np.zeros(2), "rows")


def test_one_candidate_and_fewer_wells_than_classes():
    # one candidate class: every well's whole probability, n of n
    one = np.array([[0.0, -np.inf, -np.inf]] * 3)
    balanced, error = plates.balance_plates(one, np.zeros(3), "columns")
    np.testing.assert_array_equal(np.exp(balanced[:, 0]), [1, 1, 1])
    assert error == 0.0
    # 3 wells, 6 classes: each class half a well; the error counts columns below 1 too
    rng = np.random.default_rng(4)
    log_p = log_probs(rng, 3, 6)
    balanced, error = plates.balance_plates(log_p, np.zeros(3), "sinkhorn", iterations=1, tolerance=0.0)
    miss = np.abs(np.exp(balanced).sum(axis=0) - 0.5).max()
    assert 0 < error == pytest.approx(miss, rel=1e-9)

