"""Layout coincidences: test experiments whose control-well layout equals a train experiment's (up
to a cyclic plate shift), and the test treatment labels that follow from them (`leaked`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellpaint.data.metadata import TREATMENT, wells_of


@dataclass(frozen=True)
class LayoutMatch:
    """Test experiment `test` holds, on its k-th plate, what train experiment `train` holds on its
    (k - shift)-th plate (cyclically): the same siRNA in the same well."""
    test: str
    train: str
    shift: int
    wells_compared: int

    def source_plate(self, plate: int, plates: list[int]) -> int:
        return plates[(plates.index(plate) - self.shift) % len(plates)]


def _control_layout(wells: pd.DataFrame) -> dict[str, dict[int, dict[str, int]]]:
    controls = wells[(wells["well_type"] != TREATMENT) & (wells["sirna"] >= 0)]
    layout: dict[str, dict[int, dict[str, int]]] = {}
    for (experiment, plate), rows in controls.groupby(["experiment", "plate"]):
        layout.setdefault(experiment, {})[int(plate)] = dict(zip(rows["well"], rows["sirna"]))
    return layout


def find_layout_matches(table: pd.DataFrame, min_agreement: float = 0.95) -> list[LayoutMatch]:
    """Test experiments whose control-well layout equals a train experiment's, up to a cyclic plate shift.

    Controls are labelled in both splits, so their positions can be compared. A match must cover
    most control wells of both experiments and be unique: a test experiment that fits several
    train experiments or shifts is ambiguous and not reported.
    """
    wells = wells_of(table) if "site" in table else table
    layout = _control_layout(wells)
    experiments = wells.drop_duplicates("experiment").set_index("experiment")["split"]
    matches = []
    for test in experiments[experiments == "test"].index:
        found = []
        for train in experiments[experiments == "train"].index:
            t, r = layout.get(test, {}), layout.get(train, {})
            plates = sorted(r)
            if not t or sorted(t) != plates:
                continue
            for shift in range(len(plates)):
                m = LayoutMatch(test, train, shift, 0)
                agree = compared = 0
                for plate in plates:
                    a, b = t[plate], r[m.source_plate(plate, plates)]
                    common = a.keys() & b.keys()
                    compared += len(common)
                    agree += sum(a[w] == b[w] for w in common)
                n_t = sum(map(len, t.values()))
                n_r = sum(map(len, r.values()))
                if compared >= 0.9 * max(n_t, n_r) and agree >= min_agreement * compared:
                    found.append(LayoutMatch(test, train, shift, compared))
        if len(found) == 1:
            matches.append(found[0])
    return matches


def apply_layout_matches(table: pd.DataFrame, matches: list[LayoutMatch]) -> pd.DataFrame:
    """Label the treatment wells of matched test experiments from their train twins (`leaked`)."""
    table = table.copy()
    for m in matches:
        source = table[(table["experiment"] == m.train) & (table["well_type"] == TREATMENT)]
        labels = dict(zip(zip(source["plate"], source["well"]), source["sirna"]))
        # the plates the match was found on (controls included): a plate without treatment wells still counts
        plates = sorted(table.loc[table["experiment"] == m.train, "plate"].unique().tolist())
        rows = table.index[(table["experiment"] == m.test) & (table["well_type"] == TREATMENT)]
        keys = [(m.source_plate(p, plates), w) for p, w in zip(table.loc[rows, "plate"], table.loc[rows, "well"])]
        found = np.array([labels.get(k, -1) for k in keys], dtype=np.int64)
        table.loc[rows, "sirna"] = found
        table.loc[rows, "leaked"] = found >= 0
    return table
