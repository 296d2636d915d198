"""plates.py's contract at its edges: no wells, no groups, one group, one candidate class, the
dtypes it keeps (float32 stays float32: the submission builder works in place on ~20,000 x 1,139
scores), the forbidden pairs of the assignment, rows of very different scale, and the messages
of its errors, which name the sizes that do not fit."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from cellpaint.data import plates

MASKS = np.array([[True, False, True, False, False], [False, True, False, True, False]])  # class 4 in no group


def raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


# ------------------------------------------------------------------------------- the messages


def test_error_messages_name_what_does_not_fit():
    scores = np.zeros((3, 5))
    with raises("scores must be a [wells, classes] matrix, got shape (5,)"):
        plates.margins(np.zeros(5))
    with raises("unknown group method 'vote' (expected one of prob, argmax, mode)"):
        plates.plate_group_scores(scores, np.zeros(3, int), MASKS, "vote")
    for function in (lambda m: plates.plate_group_scores(scores, np.zeros(3, int), m),
                     lambda m: plates.restrict_to_groups(scores, np.zeros(3, int), m)):
        with raises("group_masks must be [groups, 5], got (2, 4)"):
            function(MASKS[:, :4])
        with raises("group_masks must be [groups, 5], got (5,)"):
            function(MASKS[0])
    with raises("plate groups must be disjoint"):
        plates.plate_group_scores(scores, np.zeros(3, int), np.array([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]], bool))
    with raises("scores, experiment_codes and plate_codes must have one entry per well"):
        plates.infer_plate_groups(scores, np.array(["E"] * 2), np.ones(3), MASKS)
    with raises("well_groups must have one entry per well"):
        plates.restrict_to_groups(scores, np.zeros(2, int), MASKS)
    with raises("well_groups must lie in -1..1"):
        plates.restrict_to_groups(scores, np.array([0, 2, 1]), MASKS)
    with raises("well_groups must lie in -1..1"):
        plates.restrict_to_groups(scores, np.array([0, -2, 1]), MASKS)  # -2 is no "last group"
    with raises("no plate groups to choose from"):
        plates.match_plates_to_groups(np.zeros((2, 0)))
    with raises("plate_codes must have one entry per well"):
        plates.assign_plates(scores, np.zeros(2))
    with raises("scores contain NaN"):
        plates.assign_plates(np.array([[np.nan, 1.0]]), np.zeros(1))


# ------------------------------------------------------------------------- empty and single


def test_no_wells():
    empty = np.zeros((0, 5))
    assert plates.plate_ids(np.array([]), np.array([])).tolist() == []
    assert plates.plate_group_scores(empty, np.zeros(0, int), MASKS).shape == (0, 2)
    for method in ("prob", "argmax", "mode"):
        groups = plates.infer_plate_groups(empty, np.array([]), np.array([]), MASKS, method)
        assert groups.shape == (0,) and groups.dtype == np.int64
    matched = plates.match_plates_to_groups(np.zeros((0, 4)))
    assert matched.shape == (0,) and matched.dtype == np.int64
    assert plates.assign_plates(empty, np.zeros(0)).shape == (0,)
    assert plates.exclude_classes(empty, np.array([]), {1: [0]}).shape == (0, 5)


def test_no_groups_or_only_empty_groups_give_no_evidence():
    scores = np.arange(15.0).reshape(3, 5)
    plate = np.array([0, 0, 1])
    for method in ("prob", "argmax", "mode"):
        assert plates.plate_group_scores(scores, plate, np.zeros((0, 5), bool), method).shape == (2, 0)
        empty_groups = plates.plate_group_scores(scores, plate, np.zeros((2, 5), bool), method)
        np.testing.assert_array_equal(empty_groups, np.zeros((2, 2)))


def test_one_group_holds_every_plate():
    scores = np.random.default_rng(0).normal(size=(6, 5))
    one = np.array([[True, True, False, True, False]])
    groups = plates.infer_plate_groups(scores, np.array(["A", "A", "A", "B", "B", "B"]), np.array([1, 2, 3, 1, 1, 2]),
                                       one)
    assert groups.tolist() == [0] * 6


def test_experiments_are_matched_separately():
    """Two one-plate experiments holding the same group: matched together they would have to
    take different groups."""
    scores = np.array([[5.0, 0.0, 1.0, 0.0, 0.0], [4.0, 0.0, 0.0, 1.0, 0.0]])
    for method in ("prob", "argmax", "mode"):
        assert plates.infer_plate_groups(scores, np.array(["A", "B"]), np.array([1, 1]), MASKS, method).tolist() == [0, 0]


def test_the_method_is_used():
    """prob and argmax disagree here: three wells lean weakly to group 1, one strongly to group 0."""
    scores = np.array([[0.0, 0.3, 0.0, 0.0, 0.0]] * 3 + [[9.0, 0.0, 0.0, 0.0, 0.0]])
    plate = np.array([1, 1, 1, 1])
    both = np.concatenate([scores, np.array([[0, 0, 0, 9.0, 0]])])  # a second plate, clearly group 1
    experiment = np.array(["E"] * 5)
    plate = np.array([1, 1, 1, 1, 2])
    assert plates.infer_plate_groups(both, experiment, plate, MASKS, "argmax").tolist() == [1, 1, 1, 1, 0]
    assert plates.infer_plate_groups(both, experiment, plate, MASKS, "prob").tolist() == [0, 0, 0, 0, 1]
    assert plates.infer_plate_groups(both, experiment, plate, MASKS).tolist() == [0, 0, 0, 0, 1]  # prob: the default
    assert plates.plate_group_scores(both, np.array([0, 0, 0, 0, 1]), MASKS).tolist() == \
        plates.plate_group_scores(both, np.array([0, 0, 0, 0, 1]), MASKS, "prob").tolist()


def test_plate_ids_are_dense_in_experiment_then_plate_order():
    ids = plates.plate_ids(np.array(["B", "A", "A", "B", "A"]), np.array([1, 2, 1, 1, 3]))
    assert ids.tolist() == [3, 1, 0, 3, 2]


def test_class_groups():
    assert plates.class_groups(MASKS).tolist() == [0, 1, 0, 1, -1]
    assert plates.class_groups([[1, 0, 1, 0, 0], [0, 1, 0, 1, 0]]).tolist() == [0, 1, 0, 1, -1]
    assert plates.class_groups(np.zeros((0, 3), bool)).tolist() == [-1, -1, -1]


def test_masks_may_be_lists_of_0_and_1():
    scores = np.random.default_rng(1).normal(size=(4, 5))
    as_ints = MASKS.astype(int).tolist()
    groups = np.array([0, 1, -1, 0])
    np.testing.assert_array_equal(plates.restrict_to_groups(scores, groups, as_ints),
                                  plates.restrict_to_groups(scores, groups, MASKS))
    for method in ("prob", "argmax", "mode"):
        np.testing.assert_array_equal(plates.plate_group_scores(scores, np.array([0, 0, 1, 1]), as_ints, method),
                                      plates.plate_group_scores(scores, np.array([0, 0, 1, 1]), MASKS, method))
    blocks = [(r.tolist(), c.tolist()) for r, c, _ in plates.split_by_group(scores, groups.tolist(), as_ints)]
    assert blocks == [([0, 3], [0, 2]), ([1], [1, 3])]


# ------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_score_functions_keep_float32_and_float64_and_make_integers_float(dtype):
    scores = np.array([[3, 1, 2, 0, 5], [1, 4, 0, 2, 2]]).astype(dtype)
    want = np.result_type(dtype, np.float32)
    for out in (plates.log_softmax(scores), plates.restrict_to_groups(scores, np.array([0, 1]), MASKS),
                plates.exclude_classes(scores, np.array([1, 2]), {1: [0]})):
        assert out.dtype == want
    assert np.isneginf(plates.restrict_to_groups(scores, np.array([0, 1]), MASKS)).sum() == 6
    np.testing.assert_allclose(np.exp(plates.log_softmax(scores)).sum(1), 1, rtol=1e-6)
    assert plates.margins(scores).dtype == np.float64
    assert plates.infer_plate_groups(scores, np.array(["E", "E"]), np.array([1, 2]), MASKS).dtype == np.int64
    assert plates.assign_plates(scores, np.array([1, 1])).dtype == np.int64


def test_in_place_means_in_place():
    scores = np.zeros((2, 5), dtype=np.float32)
    out = plates.exclude_classes(scores, np.array([7, 8]), {8: [1]}, inplace=True)
    assert out is scores and np.isneginf(scores[1, 1]) and np.isfinite(scores[0]).all()
    copy = plates.exclude_classes(scores, np.array([7, 8]), {7: [2]})
    assert copy is not scores and np.isfinite(scores[0, 2])


# -------------------------------------------------------------------- log-softmax and margins


def test_rows_of_very_different_scale_in_one_block():
    """Each row is shifted by its own maximum: one shift for the whole block would underflow
    the rows far below the others (exp(-2000) is 0)."""
    x = np.array([[1000.0, 999.0, 998.0, 990.0, 0.0], [-1000.0, -1001.0, -1002.0, -1010.0, -2000.0]])
    shifted = np.array([0, -1, -2, -10, -1000.0])  # both rows, each less its own maximum
    expected = shifted - np.log(np.exp(shifted).sum())
    np.testing.assert_allclose(plates.log_softmax(x), [expected, expected], rtol=1e-12)
    p = np.exp(shifted[:4]) / np.exp(shifted[:4]).sum()  # over the classes of the groups
    table = plates.plate_group_scores(x, np.array([0, 1]), MASKS, "prob")
    np.testing.assert_allclose(table, [[p[0] + p[2], p[1] + p[3]]] * 2, rtol=1e-12)


def test_a_well_without_candidates_votes_for_nothing():
    scores = np.array([[1.0, 2.0, 0.0, 0.0, 0.0], [-np.inf] * 5])
    table = plates.plate_group_scores(scores, np.array([0, 0]), MASKS, "prob")
    assert np.isfinite(table).all() and table.sum() == pytest.approx(1.0)


def test_margins_with_one_two_or_no_candidates():
    assert plates.margins(np.zeros((3, 1))).tolist() == [np.inf] * 3
    assert plates.margins(np.zeros((3, 0))).tolist() == [np.inf] * 3
    assert plates.margins(np.array([[1.0, 4.0], [3.0, 0.5]])).tolist() == [3.0, 2.5]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 9))
    top = np.sort(x, axis=1)
    np.testing.assert_array_equal(plates.margins(x), top[:, -1] - top[:, -2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning for -inf - -inf in the user's output
        got = plates.margins(np.array([[-np.inf, -np.inf, -np.inf], [-np.inf, 2.0, -np.inf]]))
    assert np.isnan(got[0]) and got[1] == np.inf


def test_mode_is_the_plate_mean_of_the_best_score_per_group():
    scores = np.array([[1.0, 2.0, 3.0, 0.0, 9.0], [5.0, 0.0, 0.0, 4.0, 9.0], [2.0, 7.0, 0.0, 1.0, 9.0]])
    table = plates.plate_group_scores(scores, np.array([1, 1, 0]), MASKS, "mode")
    np.testing.assert_allclose(table, [[2.0, 7.0], [(3 + 5) / 2, (2 + 4) / 2]])  # plate 0 has one well


# -------------------------------------------------------------------------------- assignment


def test_forbidden_pairs_are_never_assigned():
    """Wells 0 and 1 may only take class 0: one of them must stay unassigned, never take 1 or 2."""
    scores = np.array([[1.0, -np.inf, -np.inf], [2.0, -np.inf, -np.inf], [-np.inf, 4.0, 5.0]])
    assert plates.assign_plates(scores, np.zeros(3)).tolist() == [-1, 0, 2]
    assert plates.assign_plates(scores, np.zeros(3), fill_unassigned=True).tolist() == [0, 0, 2]


def test_most_wells_get_a_class_before_the_scores_count():
    """The matching first maximises the number of allowed pairs: well 0 takes class 0 (score 0)
    so that well 1 can take class 1, rather than taking class 1 (score 100) itself."""
    for scores in (np.array([[0.0, 100.0], [-np.inf, 0.0]]),
                   np.array([[0.0, 0.0], [0.0, -np.inf]]),                   # all scores equal
                   np.array([[-10.0, -1.0], [-np.inf, -10.0]]),               # log-probabilities: all negative
                   np.array([[-0.5, -0.1, -0.9], [-np.inf, -0.3, -np.inf], [-0.2, -np.inf, -np.inf]])):
        labels = plates.assign_plates(scores, np.zeros(len(scores)))
        assert (labels >= 0).all(), scores
        assert np.isfinite(scores[np.arange(len(scores)), labels]).all()


def test_fill_unassigned_gives_the_best_class_and_keeps_the_matching():
    """Three wells, two classes: the matching gives class 0 to well 1 (its best is 1); only the
    unmatched well is filled, with its own best class."""
    scores = np.array([[1.0, 9.0], [5.0, 6.0], [0.0, 8.0]])
    matched = plates.assign_plates(scores, np.zeros(3))
    assert matched.tolist() == [1, 0, -1]
    assert plates.assign_plates(scores, np.zeros(3), fill_unassigned=True).tolist() == [1, 0, 1]
    # several wells left over: each gets its own best class
    crowded = np.array([[9.0, 0.0, 1.0], [0.0, 1.0, 8.0], [2.0, 7.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 6.0]])
    assert plates.assign_plates(crowded, np.zeros(5)).tolist() == [0, 2, 1, -1, -1]
    assert plates.assign_plates(crowded, np.zeros(5), fill_unassigned=True).tolist() == [0, 2, 1, 0, 2]
    # a well without any finite score stays -1
    lonely = np.array([[1.0, 2.0], [-np.inf, -np.inf]])
    assert plates.assign_plates(lonely, np.array([0, 1]), fill_unassigned=True).tolist() == [1, -1]
