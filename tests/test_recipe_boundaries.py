"""Boundaries of the recipe, where an off-by-one would go unnoticed on typical data: class 0,
one-well plates, a group of one class, a plate without any taken class, and the fold deal of
a fixed seed, pinned experiment by experiment. Each goes through the public functions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellpaint.data.folds import assign_folds, last_experiments, named_folds, split_subsets
from cellpaint.core.errors import UsageError
from cellpaint.data.structure import Structure, derive_structure
from cellpaint.data import plates
from cellpaint.modes import pseudo_labels


def well_table(rows: list[tuple]) -> pd.DataFrame:
    """A per-well metadata table from (split, experiment, plate, well_type, sirna[, sirna_true[, leaked]])."""
    out = []
    for i, row in enumerate(rows):
        split, experiment, plate, well_type, sirna = row[:5]
        sirna_true = row[5] if len(row) > 5 else sirna
        out.append({"id_code": f"{experiment}_{plate}_W{i:02d}", "experiment": experiment,
                    "cell_type": experiment.split("-")[0], "plate": plate, "well": f"W{i:02d}",
                    "well_type": well_type, "split": split, "sirna": sirna, "sirna_true": sirna_true,
                    "leaked": row[6] if len(row) > 6 else False})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------- the folds


TRAIN_EXPERIMENTS = ["A-1", "A-2", "A-3", "B-1", "B-2", "C-1", "C-2"]


def experiments_table() -> pd.DataFrame:
    rows = [("train", e, 1, "treatment", 0) for e in TRAIN_EXPERIMENTS]
    rows += [("test", "A-9", 1, "treatment", -1, 3), ("test", "D-1", 1, "treatment", -1, 2)]
    return well_table(rows)


def test_the_fold_deal_of_a_seed_is_pinned():
    """Seed 7, 4 folds: each cell type's experiments in the seeded order, the deal running on
    across cell types (A: A-1, A-3, A-2 -> folds 0, 1, 2; B: B-2, B-1 -> 3, 0; C: C-2, C-1 -> 1, 2);
    test experiments are in no fold."""
    folds = assign_folds(experiments_table(), n_folds=4, seed=7)
    assert folds == {"A-1": 0, "A-3": 1, "A-2": 2, "B-2": 3, "B-1": 0, "C-2": 1, "C-1": 2}
    assert assign_folds(experiments_table(), n_folds=4, seed=0) == {
        "A-3": 0, "A-1": 1, "A-2": 2, "B-2": 3, "B-1": 0, "C-1": 1, "C-2": 2}
    # the defaults: 6 folds (SPEC), seed 0
    assert assign_folds(experiments_table()) == {"A-3": 0, "A-1": 1, "A-2": 2, "B-2": 3, "B-1": 4, "C-1": 5, "C-2": 0}
    # one fold: everything in fold 0; more folds than experiments: one experiment a fold
    assert set(assign_folds(experiments_table(), n_folds=1, seed=7).values()) == {0}
    assert sorted(assign_folds(experiments_table(), n_folds=7, seed=7).values()) == list(range(7))
    with pytest.raises(ValueError, match="positive, got 0"):
        assign_folds(experiments_table(), n_folds=0)


def test_last_and_named_folds_take_train_experiments_only():
    table = experiments_table()
    assert last_experiments(table) == ["A-3", "B-2", "C-2"]  # not A-9 or D-1: test experiments
    assert named_folds(table, ["B-1", "A-2"]) == {"A-1": 1, "A-2": 0, "A-3": 1, "B-1": 0, "B-2": 1, "C-1": 1,
                                                  "C-2": 1}
    with pytest.raises(UsageError) as refused:
        named_folds(table, ["A-9", "D-1", "A-1"])
    assert str(refused.value) == ("--val-experiments: A-9, D-1 is not a train experiment of the data set "
                                  "(train experiments: A-1, A-2, A-3, B-1, B-2, C-1, C-2)")
    with pytest.raises(UsageError, match="named twice in A-1,A-1"):
        named_folds(table, ["A-1", "A-1"])


def class_zero_table() -> pd.DataFrame:
    """Class 0 in every role: a train treatment, a control, a val well, a leaked test well."""
    return well_table([
        ("train", "A-1", 1, "treatment", 0), ("train", "A-1", 1, "treatment", 1),
        ("train", "A-1", 1, "positive_control", 2), ("train", "A-1", 1, "negative_control", 3),
        ("train", "A-2", 1, "treatment", 0), ("train", "A-2", 1, "treatment", 1),
        ("train", "A-2", 1, "positive_control", 2),
        ("test", "A-9", 1, "treatment", 0, 0, True),       # labelled through a layout coincidence
        ("test", "A-9", 1, "treatment", -1, 1), ("test", "A-9", 1, "negative_control", 3),
    ])


def test_class_zero_wells_are_labelled_wells():
    table = class_zero_table()
    folds = {"A-1": 0, "A-2": 1}
    subsets = split_subsets(table, folds, cv_number=1)
    train = subsets["train"]
    # A-1 (fold 0) trains, class 0 included; A-2 validates; the leaked test well and the controls of
    # the validation and test experiments (labels public) train too
    assert sorted(zip(train["experiment"], train["sirna"])) == [
        ("A-1", 0), ("A-1", 1), ("A-1", 2), ("A-1", 3), ("A-2", 2), ("A-9", 0), ("A-9", 3)]
    assert sorted(subsets["val"]["sirna"]) == [0, 1] and set(subsets["val"]["experiment"]) == {"A-2"}
    assert sorted(subsets["test"]["sirna"]) == [-1, 0]  # every test treatment well
    # the controls of other experiments only with all_controls_train
    alone = split_subsets(table, folds, cv_number=1, all_controls_train=False)["train"]
    assert sorted(zip(alone["experiment"], alone["sirna"])) == [("A-1", 0), ("A-1", 1), ("A-1", 2),
                                                                 ("A-1", 3), ("A-9", 0)]
    everything = split_subsets(table, folds, cv_number=-1)
    assert len(everything["val"]) == 0 and (everything["train"]["experiment"] == "A-2").sum() == 3
    # pseudo-labelling: all val wells are candidates, a labelled (leaked) test well is not
    candidates = pseudo_labels.candidate_sites(subsets)
    assert sorted(candidates["id_code"]) == sorted(subsets["val"]["id_code"].tolist()
                                                   + subsets["test"].loc[subsets["test"]["sirna"] < 0, "id_code"].tolist())
    with pytest.raises(UsageError, match=r"^--cv-number 3: no experiment falls in that fold \(folds present: \[0, 1\]\)$"):
        split_subsets(table, folds, cv_number=3)
    with pytest.raises(UsageError, match=r"^--cv-number 0: no experiment falls in that fold \(folds present: \[1, 2\]\)$"):
        split_subsets(table, {"A-1": 1, "A-2": 2}, cv_number=0)
    # each subset a table of its own: the metadata's columns, rows numbered afresh
    for part in subsets.values():
        assert list(part.columns) == list(table.columns) and part.index.equals(pd.RangeIndex(len(part)))


def test_class_zero_is_a_class_of_the_structure():
    structure = derive_structure(class_zero_table())
    assert structure.n_classes == 4
    assert structure.treatment_classes.tolist() == [0, 1]
    assert structure.control_classes.tolist() == [2, 3]
    assert [g.tolist() for g in structure.groups] == [[0, 1]]


# --------------------------------------------------------------------------- plates, one well


def test_one_well_plates():
    """Plates of one well: each takes its best class, no class is shared across plates' rows."""
    scores = np.array([[1.0, 0.0, 3.0], [5.0, 4.0, -np.inf], [-np.inf, -np.inf, -np.inf]])
    assert plates.assign_plates(scores, np.array([0, 1, 2])).tolist() == [2, 0, -1]
    assert plates.assign_plates(scores, np.array([0, 1, 2]), fill_unassigned=True).tolist() == [2, 0, -1]
    # the same wells on one plate: class 0 goes to one well only
    assert plates.assign_plates(scores, np.array([7, 7, 7])).tolist() == [2, 0, -1]
    assert plates.assign_plates(scores[[1, 1]], np.array([7, 7])).tolist() == [0, 1]
    masks = np.array([[True, True, False], [False, False, True]])
    for method in ("prob", "argmax", "mode"):
        groups = plates.infer_plate_groups(scores[:2], np.array(["E", "E"]), np.array([1, 2]), masks, method)
        assert groups.tolist() == [1, 0], method  # plate 1 leans to class 2 (group 1), plate 2 to group 0


def test_a_plate_without_taken_classes_sorting_first_leaves_the_others_excluded():
    scores = np.zeros((4, 3))
    out = plates.exclude_classes(scores, np.array(["a", "b", "c", "b"]), {"b": [2], "c": {0, 1}, "z": [1]})
    assert np.isfinite(out[0]).all()                      # plate "a": nothing taken
    assert np.isneginf(out[[1, 3], 2]).all() and np.isfinite(out[[1, 3], :2]).all()
    assert np.isneginf(out[2, :2]).all() and out[2, 2] == 0
    numbered = plates.exclude_classes(scores, np.array([3, 5, 5, 9]), {5: [1], 9: []})
    assert np.isneginf(numbered[1:3, 1]).all() and np.isfinite(np.delete(numbered, [1, 2], 0)).all()


def test_pseudo_labels_with_a_group_of_one_class_and_one_well_plates():
    """A group of one class (5) on one-well plates: its wells have one candidate (margin +inf),
    so they come first; class 5 is taken once per plate."""
    structure = Structure(7, np.arange(6), np.array([6]), (np.array([0, 1, 2, 3, 4]), np.array([5])), ("A",))
    wells = pd.DataFrame({"id_code": ["E1_1_a", "E1_2_a", "E2_1_a", "E2_2_a"],
                          "experiment": ["E1", "E1", "E2", "E2"], "plate": [1, 2, 1, 2]})
    logits = np.full((4, 7), 0.0, dtype=np.float32)
    logits[0, 5] = logits[2, 5] = 1.0   # E1 plate 1, E2 plate 1: the one-class group
    logits[1, 0] = 9.0                  # E1 plate 2: class 0, by a wide margin
    logits[3, 1] = 9.0
    empty = pd.DataFrame({"experiment": [], "plate": []})
    chosen = pseudo_labels.select(wells, logits, structure, empty, np.zeros(0, np.int64), count=2)
    assert chosen == {"E1_1_a": 5, "E2_1_a": 5}
    chosen = pseudo_labels.select(wells, logits, structure, empty, np.zeros(0, np.int64), count=4)
    assert chosen == {"E1_1_a": 5, "E2_1_a": 5, "E1_2_a": 0, "E2_2_a": 1}
