"""submission_inputs.py on real files: matched_files reads each prediction file in turn (timed,
checked, the first matched to the metadata, the others to the first); the reference wells carry
their experiment and plate (--knn-center plate centres by them); an RxRx1-WILDS val part holds
wells of val experiments."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pandas as pd
import pytest

from cellpaint.data.prediction_file import EMBEDDING_ROWS, ROW_ORDER, WellSums, load_well_sums
from cellpaint.data.structure import Structure
from cellpaint.modes.submission_inputs import SubmissionError, match_metadata, match_reference, matched_files


def table(val_split: str = "train") -> pd.DataFrame:
    """Val experiment V-1 (two plates), test experiment X-1; V-1's split is `val_split`."""
    rows = [("V-1_1_A", val_split, "treatment", 0, 1), ("V-1_2_B", val_split, "treatment", 1, 2),
            ("V-1_2_C", val_split, "negative_control", 4, 2), ("X-1_3_A", "test", "treatment", -1, 3)]
    return pd.DataFrame([{"id_code": c, "split": s, "well_type": t, "sirna": l, "sirna_true": max(l, 0),
                          "experiment": c[:3], "plate": p, "cell_type": "A"} for c, s, t, l, p in rows])


def write(path, parts: dict) -> str:
    path.write_bytes(pickle.dumps({part: {k: [np.asarray(v, dtype=np.float32)] for k, v in wells.items()}
                                   for part, wells in parts.items()}, protocol=4))
    return str(path)


VAL = {"V-1_1_A": [1, 0, 0, 0, 0], "V-1_2_B": [0, 1, 0, 0, 0], "V-1_2_C": [0, 0, 0, 0, 1]}
TEST = {"X-1_3_A": [0, 0, 1, 0, 0]}


def test_each_file_is_timed_checked_and_matched(tmp_path):
    paths = [write(tmp_path / f"{i}.output", {"val": VAL, "test": TEST}) for i in range(3)]
    laps, checked = [], []
    seen = []
    for i, sums, wells in matched_files(paths, table(), ROW_ORDER, laps.append,
                                        lambda index, s: checked.append((index, s.path))):
        seen.append((i, sums.path, wells.id_code.tolist()))
    assert laps == ["read files"] * 3
    assert checked == [(i, p) for i, p in enumerate(paths)]
    assert seen == [(i, p, ["V-1_1_A", "V-1_2_B", "X-1_3_A"]) for i, p in enumerate(paths)]

    # the check sees each file before it is matched: refusing the second stops there
    def refuse_second(index, sums):
        if index == 1:
            raise SubmissionError(f"{sums.path}: refused")

    with pytest.raises(SubmissionError, match=re.escape(f"{paths[1]}: refused")):
        list(matched_files(paths, table(), ROW_ORDER, lambda _: None, refuse_second))
    other = write(tmp_path / "other.output", {"val": VAL, "test": {"X-1_9_Z": [0, 0, 1, 0, 0]}})
    with pytest.raises(SubmissionError, match="^" + re.escape(f"{other} holds different test wells than {paths[0]} "
                                                              "(1 vs 1 wells; e.g. 'X-1_9_Z' is in one only)") + "$"):
        list(matched_files([paths[0], other], table(), ROW_ORDER, lambda _: None))


def test_the_reference_wells_carry_their_experiment_and_plate(tmp_path):
    structure = Structure(5, np.array([0, 1]), np.array([4]), (np.array([0, 1]),), ("A",))
    path = write(tmp_path / "net.embeddings", {"train": VAL, "test": TEST})
    ref = match_reference(load_well_sums(path, EMBEDDING_ROWS), table(), structure)
    assert ref.keep.tolist() == [0, 1] and ref.label.tolist() == [0, 1] and ref.ignored_controls == 1
    assert ref.experiment.tolist() == ["V-1", "V-1"] and ref.plate.tolist() == [1, 2]


def test_a_wilds_val_part_holds_wells_of_val_experiments():
    ids = {"val": np.array(sorted(VAL), dtype=str), "test": np.array(sorted(TEST), dtype=str)}
    sums = WellSums("w.output", 5, ids, {}, np.zeros((4, 5), dtype=np.float32))
    wells = match_metadata(sums, table("val"))
    assert wells.id_code.tolist() == ["V-1_1_A", "V-1_2_B", "X-1_3_A"] and wells.n_val == 2
    with pytest.raises(SubmissionError, match=r"^w\.output: its test part holds 2 well\(s\) of train experiments "
                                              r"\(e\.g\. 'V-1_1_A'\)$"):
        match_metadata(WellSums("w.output", 5, {"val": ids["test"][:0], "test": ids["val"][:2]}, {},
                                np.zeros((2, 5), dtype=np.float32)), table("val"))
