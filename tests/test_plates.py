"""plates.py: group inference, class masks and per-plate assignment on hand-made scores."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellpaint.data import plates  # noqa: E402


def planted(seed: int = 0, n_experiments: int = 3, n_groups: int = 4, group_size: int = 6,
            signal: float = 3.5, n_controls: int = 2):
    """Scores of treatment wells with a planted plate-group permutation per experiment.

    Classes: n_groups * group_size treatments (random partition), then `n_controls` controls.
    Every plate holds all classes of its group, one well each. Returns the arrays of plates.py's
    API plus the truth.

    `signal` 3.5 so that the planted groups are found whatever the seed: at 2.5 the argmax votes
    missed a plate for 4 of seeds 0-199 (all plates) and 6 (one plate left out); at 3.5 for none
    (the summed probabilities found every plate at both).
    """
    rng = np.random.default_rng(seed)
    n_classes = n_groups * group_size + n_controls
    groups = rng.permutation(n_groups * group_size).reshape(n_groups, group_size)
    masks = np.zeros((n_groups, n_classes), dtype=bool)
    for g, classes in enumerate(groups):
        masks[g, classes] = True
    experiments, plate_numbers, truth_groups, labels = [], [], [], []
    for e in range(n_experiments):
        order = rng.permutation(n_groups)
        for p in range(n_groups):
            classes = rng.permutation(groups[order[p]])
            experiments += [f"EXP-{e:02d}"] * group_size
            plate_numbers += [p + 1] * group_size
            truth_groups += [order[p]] * group_size
            labels += classes.tolist()
    labels = np.array(labels)
    scores = rng.standard_normal((len(labels), n_classes))
    scores[np.arange(len(labels)), labels] += signal
    return (scores, np.array(experiments), np.array(plate_numbers), masks,
            np.array(truth_groups), labels)


# ----------------------------------------------------------------------------- group inference


@pytest.mark.parametrize("method", ["prob", "argmax"])
def test_group_inference_finds_the_planted_permutation(method):
    scores, experiments, plate_numbers, masks, truth, _ = planted()
    found = plates.infer_plate_groups(scores, experiments, plate_numbers, masks, method=method)
    np.testing.assert_array_equal(found, truth)


@pytest.mark.parametrize("method", ["prob", "argmax"])
def test_group_inference_with_three_of_four_plates(method):
    scores, experiments, plate_numbers, masks, truth, _ = planted(seed=1)
    keep = ~((experiments == "EXP-01") & (plate_numbers == 2))
    found = plates.infer_plate_groups(scores[keep], experiments[keep], plate_numbers[keep], masks, method)
    np.testing.assert_array_equal(found, truth[keep])
    # the three remaining plates of the experiment hold three different groups
    sub = experiments[keep] == "EXP-01"
    assert len(set(found[sub].tolist())) == 3


def test_group_inference_rows_in_any_order_and_rows_missing():
    scores, experiments, plate_numbers, masks, truth, _ = planted(seed=2)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(truth))[: len(truth) - 5]  # shuffled, a few wells dropped
    found = plates.infer_plate_groups(scores[order], experiments[order], plate_numbers[order], masks)
    np.testing.assert_array_equal(found, truth[order])


def brute_force_groups(table: np.ndarray) -> float:
    n_plates, n_groups = table.shape
    return max(sum(table[p, g] for p, g in enumerate(perm))
               for perm in itertools.permutations(range(n_groups), n_plates))


@pytest.mark.parametrize("shape", [(4, 4), (3, 4), (2, 5), (1, 3)])
def test_joint_plate_ordering_is_the_best_of_all_orderings(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        table = rng.random(shape)
        groups = plates.match_plates_to_groups(table)
        assert len(set(groups.tolist())) == shape[0]  # distinct groups
        assert table[np.arange(shape[0]), groups].sum() == pytest.approx(brute_force_groups(table))


def test_joint_ordering_is_not_greedy():
    # both plates prefer group 0; jointly the second must take group 1
    table = np.array([[10.0, 0.0], [6.0, 5.0]])
    assert plates.match_plates_to_groups(table).tolist() == [0, 1]


def test_more_plates_than_groups_reuses_groups_evenly():
    table = np.random.default_rng(0).random((5, 2))
    groups = plates.match_plates_to_groups(table)
    assert sorted(np.bincount(groups, minlength=2).tolist()) == [2, 3]


def test_plate_group_scores_methods():
    masks = np.array([[True, True, False, False, False], [False, False, True, True, False]])
    scores = np.array([[5.0, 0, 0, 0, 9.0],     # best overall is a control class: ignored
                       [0, 0, 0, 3.0, 0]])
    index = np.array([0, 0])
    counts = plates.plate_group_scores(scores, index, masks, method="argmax")
    assert counts.tolist() == [[1.0, 1.0]]
    probs = plates.plate_group_scores(scores, index, masks, method="prob")
    assert probs.sum() == pytest.approx(2.0)  # one vote per well
    assert probs[0, 0] > 0.9 and probs[0, 1] > 0.9


def test_plate_ids_pair_experiment_and_plate():
    ids = plates.plate_ids(np.array(["A", "A", "B", "B"]), np.array([1, 2, 1, 1]))
    assert ids[0] != ids[2] and ids[2] == ids[3] and len(set(ids.tolist())) == 3


# ----------------------------------------------------------------------------------- masks


def test_restrict_to_groups():
    masks = np.array([[True, False, True], [False, True, False]])
    scores = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = plates.restrict_to_groups(scores, np.array([0, 1, -1]), masks)
    assert np.isneginf(out[0, 1]) and out[0, 0] == 0 and out[0, 2] == 2
    assert np.isneginf(out[1, [0, 2]]).all() and out[1, 1] == 4
    np.testing.assert_array_equal(out[2], scores[2])  # group -1: untouched
    assert np.isfinite(scores).all()  # the input is left alone unless inplace
    plates.restrict_to_groups(scores, np.array([0, 1, -1]), masks, inplace=True)
    np.testing.assert_array_equal(scores, out)
    with pytest.raises(ValueError):
        plates.restrict_to_groups(scores, np.array([0, 2, 0]), masks)


def test_split_by_group_is_the_compact_restriction():
    rng = np.random.default_rng(3)
    masks = np.array([[True, False, True, False, False], [False, True, False, True, False]])
    scores = rng.standard_normal((6, 5))
    well_groups = np.array([1, 0, -1, 1, 0, 0])
    restricted = plates.restrict_to_groups(scores, well_groups, masks)
    seen = []
    for rows, classes, block in plates.split_by_group(scores, well_groups, masks):
        np.testing.assert_array_equal(block, restricted[np.ix_(rows, classes)])
        assert np.isneginf(np.delete(restricted[rows], classes, axis=1)).all()
        seen += rows.tolist()
    assert sorted(seen) == [0, 1, 3, 4, 5]  # group -1 is in no block


def test_exclude_classes_and_margins():
    scores = np.array([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    out = plates.exclude_classes(scores, np.array(["p1", "p1", "p2"]), {"p1": [0], "p3": [1]})
    assert np.isneginf(out[:2, 0]).all() and np.isfinite(out[2]).all()
    np.testing.assert_allclose(plates.margins(out), [1.0, 1.0, 1.0])
    one = np.array([[-np.inf, 2.0, -np.inf]])
    assert plates.margins(one)[0] == np.inf


def test_log_softmax_keeps_candidates_out():
    scores = np.array([[1.0, -np.inf, 3.0], [-np.inf, -np.inf, -np.inf], [0.0, 0.0, 0.0]])
    out = plates.log_softmax(scores)
    np.testing.assert_allclose(np.exp(out[0]).sum(), 1.0)
    assert np.isneginf(out[0, 1]) and np.isneginf(out[1]).all() and not np.isnan(out).any()
    np.testing.assert_allclose(out[2], np.log(1 / 3))


# ------------------------------------------------------------------------------- assignment


def brute_force_assignment(block: np.ndarray) -> float:
    n_wells, n_classes = block.shape
    return max(block[np.arange(n_wells), list(perm)].sum()
               for perm in itertools.permutations(range(n_classes), n_wells))


@pytest.mark.parametrize("n_wells,n_classes", [(4, 4), (4, 6), (3, 7), (5, 5)])
def test_assignment_equals_brute_force_and_never_repeats(n_wells, n_classes):
    rng = np.random.default_rng(n_wells * 10 + n_classes)
    for _ in range(10):
        block = rng.standard_normal((n_wells, n_classes))
        labels = plates.assign_plates(block, np.zeros(n_wells, dtype=int))
        assert len(set(labels.tolist())) == n_wells and labels.min() >= 0
        assert block[np.arange(n_wells), labels].sum() == pytest.approx(brute_force_assignment(block))


def test_assignment_respects_forbidden_classes_and_plates():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((12, 8))
    scores[:, 6:] = -np.inf                        # never candidates
    scores[rng.random((12, 8)) < 0.2] = -np.inf    # some more forbidden pairs
    plate = np.array([0, 1, 2] * 4)                # plates interleaved in row order
    labels = plates.assign_plates(scores, plate)
    for p in range(3):
        got = labels[plate == p]
        assert len(set(got.tolist())) == len(got)
        block = scores[plate == p]
        assert np.isfinite(block[np.arange(len(got)), got]).all()
        finite_best = brute_force_assignment(np.where(np.isfinite(block), block, -1e9))
        assert block[np.arange(len(got)), got].sum() == pytest.approx(finite_best)


def test_assignment_with_more_wells_than_classes():
    scores = np.array([[3.0, 0.0], [2.0, 1.0], [5.0, -np.inf]])
    labels = plates.assign_plates(scores, np.zeros(3, dtype=int))
    assert sorted(labels.tolist()) == [-1, 0, 1]
    assert labels[2] == 0  # the only candidate of the third well is 0
    filled = plates.assign_plates(scores, np.zeros(3, dtype=int), fill_unassigned=True)
    assert (filled >= 0).all() and sorted(filled.tolist())[1:] == [0, 1]


def test_assignment_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        plates.assign_plates(np.array([[np.nan, 1.0]]), np.zeros(1))


def test_solver_matches_public_scipy():
    from scipy.optimize import linear_sum_assignment

    matrix = np.random.default_rng(0).random((7, 9))
    ours = plates._solver()(matrix, maximize=True)
    theirs = linear_sum_assignment(matrix, maximize=True)
    np.testing.assert_array_equal(ours[1], theirs[1])
