"""submission/wells.py on hand-made files: a prediction (or embeddings) file's wells matched to
the metadata (val rows first, then test rows; controls set aside and counted), and each refusal
as the one line the user sees, naming the file, the count and an example well."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from cellpaint.data.structure import Structure
from cellpaint.data.prediction_file import WellSums
from cellpaint.modes.submission_inputs import SubmissionError, check_same_wells, first_example, match_metadata, match_reference


def table() -> pd.DataFrame:
    """Train experiment T-1 (treatments, a control, an unlabelled well), test experiment X-1."""
    rows = [("T-1_1_A", "train", "treatment", 0, 0), ("T-1_1_B", "train", "treatment", 1, 1),
            ("T-1_1_C", "train", "positive_control", 4, 4), ("T-1_1_D", "train", "treatment", -1, -1),
            ("X-1_1_A", "test", "treatment", -1, 1), ("X-1_1_B", "test", "treatment", -1, 0),
            ("X-1_1_C", "test", "negative_control", 5, 5)]
    return pd.DataFrame([{"id_code": c, "split": s, "well_type": t, "sirna": l, "sirna_true": tl,
                          "experiment": c[:3], "plate": 1, "cell_type": "T" if c[0] == "T" else "X"}
                         for c, s, t, l, tl in rows])


def sums(path: str = "a.output", val=("T-1_1_A", "T-1_1_B", "T-1_1_C"), test=("X-1_1_A", "X-1_1_B", "X-1_1_C"),
         train=(), width: int = 6) -> WellSums:
    ids = {"train": np.array(sorted(train), dtype=str), "val": np.array(sorted(val), dtype=str),
           "test": np.array(sorted(test), dtype=str)}
    matrix = np.zeros((sum(map(len, ids.values())), width), dtype=np.float32)
    return WellSums(path, width, ids, {}, matrix)


def refused(message: str):
    return pytest.raises(SubmissionError, match="^" + re.escape(message) + "$")


def test_wells_are_val_then_test_treatments_with_their_known_labels():
    wells = match_metadata(sums(), table())
    assert wells.id_code.tolist() == ["T-1_1_A", "T-1_1_B", "X-1_1_A", "X-1_1_B"]
    assert wells.label.tolist() == [0, 1, 1, 0]  # val: the label; test: the ground truth where known
    assert wells.n_val == 2 and wells.n == 4 and wells.ignored_controls == 2  # one val and one test control
    assert {part: keep.tolist() for part, keep in wells.keep.items()} == {"val": [0, 1], "test": [0, 1]}
    assert wells.experiment.tolist() == ["T-1", "T-1", "X-1", "X-1"] and wells.cell_type.tolist() == list("TTXX")
    assert wells.label.dtype == np.int64


def test_the_reference_wells_are_the_labelled_train_treatments():
    structure = Structure(6, np.array([0, 1]), np.array([4, 5]), (np.array([0, 1]),), ("T", "X"))
    ref = match_reference(sums("a.embeddings", train=("T-1_1_A", "T-1_1_B", "T-1_1_C")), table(), structure)
    assert ref.keep.tolist() == [0, 1] and ref.label.tolist() == [0, 1] and ref.ignored_controls == 1
    with refused("a.embeddings: 1 train well(s) have no treatment label in the metadata (e.g. 'T-1_1_D')"):
        match_reference(sums("a.embeddings", train=("T-1_1_A", "T-1_1_D")), table(), structure)
    with refused("a.embeddings: 1 train well(s) are not in the metadata (e.g. 'Z-9_1_A'): do the embeddings "
                 "belong to this --data?"):
        match_reference(sums("a.embeddings", train=("T-1_1_A", "Z-9_1_A")), table(), structure)


def test_refusals_name_the_file_the_count_and_an_example():
    with refused("a.output: 2 test well(s) are not in the metadata (e.g. 'Y-1_1_A'): do the predictions belong "
                 "to this --data?"):
        match_metadata(sums(test=("X-1_1_A", "X-1_1_B", "Y-1_1_A", "Y-1_1_B")), table())
    with refused("a.output: its val part holds 1 well(s) of test experiments (e.g. 'X-1_1_A')"):
        match_metadata(sums(val=("T-1_1_A", "X-1_1_A"), test=("X-1_1_B",)), table())
    with refused("a.output: its test part holds 2 well(s) of train experiments (e.g. 'T-1_1_A')"):
        match_metadata(sums(val=(), test=("T-1_1_A", "T-1_1_B", "X-1_1_A", "X-1_1_B")), table())
    with refused("a.output: 1 val well(s) have no label in the metadata (e.g. 'T-1_1_D')"):
        match_metadata(sums(val=("T-1_1_A", "T-1_1_D")), table())
    with refused("a.output: 1 test well(s) of the metadata are missing from the predictions (e.g. 'X-1_1_B')"):
        match_metadata(sums(test=("X-1_1_A",)), table())


def test_files_of_other_wells_or_widths_are_refused_naming_both():
    first = sums()
    check_same_wells(first, sums("b.output"))
    with refused("b.output has 7 classes per vector but a.output has 6: files of different models/class sets"):
        check_same_wells(first, sums("b.output", width=7))
    check_same_wells(first, sums("b.output", width=7), same_width=False)
    with refused("b.output holds different val wells than a.output (2 vs 3 wells; e.g. 'T-1_1_C' is in one only)"):
        check_same_wells(first, sums("b.output", val=("T-1_1_A", "T-1_1_B")))
    with refused("b.output holds different test wells than a.output (4 vs 3 wells; e.g. 'X-1_1_D' is in one only)"):
        check_same_wells(first, sums("b.output", test=("X-1_1_A", "X-1_1_B", "X-1_1_C", "X-1_1_D")))
    check_same_wells(first, sums("b.output", train=("T-1_1_A",)))  # 'train' is not compared by default
    with refused("b.output holds different train wells than a.output (1 vs 0 wells; e.g. 'T-1_1_A' is in one only)"):
        check_same_wells(first, sums("b.output", train=("T-1_1_A",)), parts=("train", "val", "test"))


def test_first_example():
    assert first_example(np.array(["b", "a"])) == "'b'" and first_example(np.array([], dtype=str)) == ""
