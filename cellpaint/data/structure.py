"""What the metadata says about the problem: the class count, treatment and control classes, and
the plate groups (disjoint sets of treatment classes, each plate holding one), all derived from
the labels training may use. Nothing here is a constant of the competition."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellpaint.core.errors import DataError, UsageError
from cellpaint.data.metadata import TREATMENT, wells_of


@dataclass(frozen=True)
class Structure:
    """What the metadata says about the problem; nothing here is a constant of the competition."""
    n_classes: int
    treatment_classes: np.ndarray       # sorted class ids seen in treatment wells
    control_classes: np.ndarray         # sorted class ids seen in control wells
    groups: tuple[np.ndarray, ...]      # plate groups: disjoint sorted sets of treatment classes
    cell_types: tuple[str, ...]

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def group_masks(self, n_classes: int | None = None) -> np.ndarray:
        """Boolean [n_groups, n_classes] (or over `n_classes` columns, e.g. a prediction file's):
        which classes each plate group holds. `cellpaint.data.plates.class_groups` turns it
        into the group of each class."""
        masks = np.zeros((self.n_groups, n_classes or self.n_classes), dtype=bool)
        for g, classes in enumerate(self.groups):
            masks[g, classes] = True
        return masks


def _plate_components(plates: list[np.ndarray], n: int) -> np.ndarray:
    """Union-find over classes: the classes sharing a plate belong to one group."""
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for classes in plates:
        root = find(classes[0])
        for c in classes[1:]:
            parent[find(c)] = root
    return np.array([find(i) for i in range(n)])


def _spans(values: np.ndarray, limit: int = 3) -> str:
    """Sorted integers as ranges: '24..998', '5, 9..11'."""
    spans, start = [], values[0]
    for a, b in zip(values, list(values[1:]) + [None]):
        if b is None or b != a + 1:
            spans.append(f"{start}..{a}" if a != start else f"{a}")
            start = b
    return ", ".join(spans[:limit]) + (", ..." if len(spans) > limit else "")


def derive_structure(table: pd.DataFrame, n_classes: int | None = None) -> Structure:
    """Class count, treatment/control classes and plate groups, from the labels training may use."""
    wells = wells_of(table) if "site" in table else table
    known = wells[wells["sirna"] >= 0]
    if known.empty:
        raise DataError("the metadata has no labelled wells: nothing to train on or score against")
    derived = int(max(wells["sirna"].max(), wells["sirna_true"].max())) + 1
    if n_classes is not None and n_classes < derived:
        raise UsageError(f"--classes {n_classes} is smaller than the {derived} classes in the metadata")
    if not ((known["well_type"] == TREATMENT) & (known["split"] == "train")).any():
        raise DataError("the metadata has no labelled treatment wells in train: nothing to train on "
                        "(an empty train.csv, or a metadata.csv without train treatment rows?)")
    if n_classes is None:
        # the class count is derived as the largest label + 1, so a typo (999 among 24 classes) would
        # make classes no well has: in the real data every class, treatment or control, is in some well
        labels = pd.concat([wells.loc[wells["sirna"] >= 0, ["id_code", "split", "sirna"]],
                            wells.loc[wells["sirna_true"] >= 0, ["id_code", "split", "sirna_true"]]
                            .rename(columns={"sirna_true": "sirna"})])
        empty = np.setdiff1d(np.arange(derived), labels["sirna"].unique())
        if empty.size:
            above = labels[labels["sirna"] > empty[0]].sort_values("sirna", ascending=False)
            top = above.iloc[0]
            raise DataError(f"labels leave {empty.size} class(es) without any well ({_spans(empty)}): is label "
                            f"{top.sirna} of {top.split} well {top.id_code} a typo? ({above['id_code'].nunique()} "
                            f"well(s) above the gap; --classes N allows classes that no well has)")
    treat = known[known["well_type"] == TREATMENT]
    treatment_classes = np.sort(treat["sirna"].unique())
    control_classes = np.sort(known.loc[known["well_type"] != TREATMENT, "sirna"].unique())
    overlap = np.intersect1d(treatment_classes, control_classes)
    if overlap.size:
        raise DataError(f"classes {overlap[:5].tolist()} occur both as treatment and as control")

    by_plate = treat.groupby(["experiment", "plate"])["sirna"]
    plate_classes = {key: np.unique(v.to_numpy()) for key, v in by_plate}
    roots = _plate_components(list(plate_classes.values()), derived)
    groups = sorted((np.flatnonzero(roots == r) for r in np.unique(roots[treatment_classes])),
                    key=lambda g: g[0])
    groups = tuple(np.intersect1d(g, treatment_classes) for g in groups)
    return Structure(
        n_classes=n_classes or derived,
        treatment_classes=treatment_classes,
        control_classes=control_classes,
        groups=groups,
        cell_types=tuple(sorted(wells["cell_type"].unique())),
    )
