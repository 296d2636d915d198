"""folds.py's newer rows on hand-made tables: the cell types --val-last-experiment leaves without a
train experiment (only_experiments), and the trainer's rows of an RxRx1-WILDS split with what the
1st-place recipe adds only when asked (layout-leaked test wells, controls of val and test)."""
from __future__ import annotations

import pandas as pd

from cellpaint.data.folds import only_experiments, wilds_subsets


def experiments(*rows: tuple[str, str]) -> pd.DataFrame:
    """(split, experiment) per row; the cell type is the experiment's prefix."""
    return pd.DataFrame({"split": [s for s, _ in rows], "experiment": [e for _, e in rows],
                         "cell_type": [e.split("-")[0] for _, e in rows]})


def test_only_experiments_names_the_cell_types_with_one_train_experiment():
    table = experiments(("train", "A-1"), ("train", "A-1"), ("train", "A-2"),  # A: two (one repeated)
                        ("train", "B-2"), ("train", "B-2"), ("test", "B-9"),   # B: one, and a test one
                        ("test", "C-1"),                                        # C: test only
                        ("train", "D-1"))
    assert only_experiments(table) == {"B": "B-2", "D": "D-1"}
    assert only_experiments(table[table["cell_type"] == "A"]) == {}
    assert only_experiments(table[table["split"] == "test"]) == {}


COLUMNS = ["id_code", "experiment", "cell_type", "plate", "well", "well_type", "split", "sirna", "sirna_true",
           "leaked", "site"]


def wilds_table() -> pd.DataFrame:
    """Two sites of each well: a train experiment (a treatment and a control of class 0), a val
    experiment (a treatment, a control of class 0, one of class 5), a test experiment (a treatment
    labelled by a layout coincidence, one hidden, a control of class 0)."""
    wells = [("T_1", "A-1", "treatment", "train", 3, 3, False), ("T_2", "A-1", "negative_control", "train", 0, 0, False),
             ("V_1", "A-2", "treatment", "val", 4, 4, False), ("V_2", "A-2", "negative_control", "val", 0, 0, False),
             ("V_3", "A-2", "positive_control", "val", 5, 5, False),
             ("X_1", "A-3", "treatment", "test", 2, 2, True), ("X_2", "A-3", "treatment", "test", -1, 1, False),
             ("X_3", "A-3", "negative_control", "test", 0, 0, False)]
    rows = [(code, experiment, "A", 1, code, kind, split, sirna, truth, leaked, site)
            for code, experiment, kind, split, sirna, truth, leaked in wells for site in (1, 2)]
    return pd.DataFrame(rows, columns=COLUMNS)


def sites(frame: pd.DataFrame) -> list[tuple[str, int]]:
    return sorted(zip(frame["id_code"], frame["site"]))


def test_wilds_train_rows_add_leaked_test_wells_and_asked_for_controls():
    table = wilds_table().iloc[::-1].reset_index(drop=True)  # any row order: the parts keep the table's
    plain = wilds_subsets(table, "official")
    # site 1 of the train experiments, and every site of a test well labelled by a layout coincidence
    assert sites(plain["train"]) == [("T_1", 1), ("T_2", 1), ("X_1", 1), ("X_1", 2)]
    assert sites(plain["val"]) == [(c, s) for c in ("V_1", "V_2", "V_3") for s in (1, 2)]
    assert sites(plain["id_test"]) == [("T_1", 2), ("T_2", 2)]
    assert len(plain["test"]) == 6
    # --all-controls-train: the controls of the val and test experiments too (class 0 included), the
    # leaked wells still; not the train experiments' site 2 (the ID test)
    controls = wilds_subsets(table, "official", all_controls_train=True)
    assert sites(controls["train"]) == [("T_1", 1), ("T_2", 1), ("V_2", 1), ("V_2", 2), ("V_3", 1), ("V_3", 2),
                                        ("X_1", 1), ("X_1", 2), ("X_3", 1), ("X_3", 2)]
    # every part is a table like the one read, numbered from 0
    for name, part in controls.items():
        assert list(part.columns) == COLUMNS and part.index.equals(pd.RangeIndex(len(part))), name
    train = controls["train"].set_index(["id_code", "site"])
    assert train.loc[("X_1", 2), "sirna"] == 2 and train.loc[("V_3", 1), "sirna"] == 5
