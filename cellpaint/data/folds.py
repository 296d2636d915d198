"""Which train experiments validate: folds dealt per cell type, named folds, the 41st place's last
experiments, and the train/val/test rows the trainer reads for a chosen fold."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cellpaint.core.errors import UsageError
from cellpaint.data.metadata import TREATMENT
from cellpaint.data.wilds import part_masks


def assign_folds(table: pd.DataFrame, n_folds: int = 6, seed: int = 0) -> dict[str, int]:
    """Validation fold of each train experiment: dealt within each cell type after a seeded shuffle.

    The deal continues across cell types rather than restarting at fold 0, so folds stay balanced
    (and none is empty) when a cell type has fewer experiments than there are folds.
    """
    if n_folds < 1:
        raise ValueError(f"the number of folds must be positive, got {n_folds}")
    rng = np.random.default_rng(seed)
    train = table[table["split"] == "train"]
    folds: dict[str, int] = {}
    turn = 0
    for _, experiments in sorted(train.groupby("cell_type")["experiment"]):
        for experiment in rng.permutation(sorted(experiments.unique())):
            folds[str(experiment)] = turn % n_folds
            turn += 1
    return folds


def last_experiments(table: pd.DataFrame) -> list[str]:
    """The last train experiment of each cell type, in name order (HEPG2-07, HUVEC-16, RPE-07,
    U2OS-03 in the competition data): the 41st place's validation split."""
    train = table.loc[table["split"] == "train", ["cell_type", "experiment"]].astype(str).drop_duplicates()
    return sorted(train.sort_values("experiment").groupby("cell_type")["experiment"].last())


def only_experiments(table: pd.DataFrame) -> dict[str, str]:
    """Cell type -> its train experiment, for the cell types that have only one."""
    train = table.loc[table["split"] == "train", ["cell_type", "experiment"]].astype(str).drop_duplicates()
    counts = train.groupby("cell_type")["experiment"]
    return {cell: experiments.iloc[0] for cell, experiments in counts if len(experiments) == 1}


def named_folds(table: pd.DataFrame, validation: list[str]) -> dict[str, int]:
    """Folds that put exactly the named train experiments in fold 0 (validation) and every other
    train experiment in fold 1: `--val-experiments`, for a split chosen by name (e.g. the 1st
    place's per-fold table) instead of dealt."""
    train = sorted(table.loc[table["split"] == "train", "experiment"].astype(str).unique())
    unknown = [e for e in validation if e not in train]
    if unknown:
        raise UsageError(f"--val-experiments: {', '.join(unknown)} is not a train experiment of the data set "
                        f"(train experiments: {', '.join(train)})")
    if len(set(validation)) != len(validation):
        raise UsageError(f"--val-experiments: an experiment is named twice in {','.join(validation)}")
    return {e: 0 if e in validation else 1 for e in train}


def split_subsets(table: pd.DataFrame, folds: dict[str, int], cv_number: int,
                  all_controls_train: bool = True) -> dict[str, pd.DataFrame]:
    """The rows the trainer needs: `train`, `val` and `test`.

    - train: labelled wells of the train experiments outside the validation fold (controls too),
      test wells labelled through a layout coincidence, and, with `all_controls_train`, the
      control wells of validation and test experiments (their labels are public).
    - val: treatment wells of the validation experiments (scored on treatment only).
    - test: treatment wells of the test experiments (all of them: the submission needs every one).
    """
    if cv_number >= 0 and cv_number not in set(folds.values()):
        raise UsageError(f"--cv-number {cv_number}: no experiment falls in that fold "
                        f"(folds present: {sorted(set(folds.values()))})")
    in_val = table["experiment"].map(folds).eq(cv_number) & (cv_number >= 0)
    treatment = table["well_type"] == TREATMENT
    train_split = table["split"] == "train"
    labelled = table["sirna"] >= 0
    train = (train_split & ~in_val & labelled) | (table["leaked"] & ~in_val)
    if all_controls_train:
        train |= ~treatment & labelled
    subsets = {
        "train": table[train],
        "val": table[train_split & in_val & treatment],
        "test": table[~train_split & treatment],
    }
    return {k: v.reset_index(drop=True) for k, v in subsets.items()}


def wilds_subsets(table: pd.DataFrame, scheme: str, all_controls_train: bool = False) -> dict[str, pd.DataFrame]:
    """The trainer's rows for an RxRx1-WILDS split `scheme` (data/wilds.py): `train`, `val`, `test`
    and, for `official`, `id_test`, each exactly the package's part (every well type), the train
    rows with their labels (mixed-to-test trains on site 1 of the test experiments).

    What the 1st-place recipe adds stays outside the standard track, and is added only as asked:
    test wells labelled through a layout coincidence (all their sites), and with
    `all_controls_train` the control wells of the val and test experiments.
    """
    masks = part_masks(table, scheme)
    train = table[masks["train"]].assign(sirna=table.loc[masks["train"], "sirna_true"])
    extra = table["leaked"].to_numpy() & ~masks["train"]
    if all_controls_train:
        extra |= (table["split"].isin(("val", "test")) & (table["well_type"] != TREATMENT)
                  & (table["sirna"] >= 0)).to_numpy() & ~masks["train"]
    subsets = {"train": pd.concat([train, table[extra]])}
    subsets.update({name: table[mask] for name, mask in masks.items() if name != "train"})
    return {k: v.reset_index(drop=True) for k, v in subsets.items()}
