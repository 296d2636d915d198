"""The wells of prediction files, matched to the metadata, and the stage-by-stage scoreboard.

make_submission.py reads prediction files into `Wells` (the rows every stage works on: val wells
first, then test wells), refuses files that do not match the metadata or each other
(`SubmissionError`, one line naming the file), and keeps a `Scoreboard` of validation (and, where
the metadata has them, test) accuracies after every stage. `Ensemble` is what the plate stages
read, from either path (logits in make_submission.py, kNN in knn_submission.py).

numpy and pandas are imported inside the functions: make_submission.py sets the BLAS thread
count before anything imports numpy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from cellpaint.errors import CellpaintError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cellpaint.data.metadata import Structure
    from cellpaint.prediction.prediction_file import WellSums


class SubmissionError(CellpaintError, ValueError):
    """A problem with the command line or the prediction files, named in one line."""


# ------------------------------------------------------------------------------- the wells


@dataclass
class Wells:
    """The treatment wells being predicted: validation rows first, then test rows."""
    keep: dict                     # part -> positions of the treatment wells among them
    id_code: np.ndarray            # per row
    experiment: np.ndarray
    plate: np.ndarray
    cell_type: np.ndarray
    label: np.ndarray              # known class or -1
    n_val: int
    ignored_controls: int = 0

    @property
    def n(self) -> int:
        return len(self.id_code)


def first_example(values: np.ndarray) -> str:
    return repr(str(values[0])) if len(values) else ""


def match_metadata(first: WellSums, wells_table: pd.DataFrame) -> Wells:
    """Map the first file's wells onto the metadata and check they are the ones a submission needs."""
    import numpy as np
    import pandas as pd

    from cellpaint.data.metadata import TREATMENT

    name = first.path
    index = pd.Index(wells_table["id_code"])
    keep, rows = {}, {}
    ignored = 0
    for part in ("val", "test"):
        ids = first.ids[part]
        pos = index.get_indexer(ids)
        if (pos < 0).any():
            unknown = ids[pos < 0]
            raise SubmissionError(f"{name}: {len(unknown)} {part} well(s) are not in the metadata "
                                  f"(e.g. {first_example(unknown)}): do the predictions belong to this --data?")
        meta = wells_table.iloc[pos]
        split = "test" if part == "test" else "train"
        wrong = meta["split"].to_numpy() != split
        if wrong.any():
            raise SubmissionError(f"{name}: its {part} part holds {int(wrong.sum())} well(s) of "
                                  f"{'train' if split == 'test' else 'test'} experiments "
                                  f"(e.g. {first_example(ids[wrong])})")
        treatment = (meta["well_type"] == TREATMENT).to_numpy()
        ignored += int((~treatment).sum())  # controls are never candidates for the submission
        keep[part] = np.flatnonzero(treatment)
        rows[part] = meta[treatment]
    unlabelled = rows["val"]["sirna"].to_numpy() < 0
    if unlabelled.any():
        raise SubmissionError(f"{name}: {int(unlabelled.sum())} val well(s) have no label in the metadata "
                              f"(e.g. {first_example(rows['val']['id_code'].to_numpy()[unlabelled])})")
    needed = wells_table.loc[(wells_table["split"] == "test") & (wells_table["well_type"] == TREATMENT),
                             "id_code"].to_numpy()
    missing = needed[~pd.Index(needed).isin(rows["test"]["id_code"])]  # hashing: object arrays
    if missing.size:
        raise SubmissionError(f"{name}: {missing.size} test well(s) of the metadata are missing from "
                              f"the predictions (e.g. {first_example(missing)})")
    both = pd.concat([rows["val"], rows["test"]])
    label = np.concatenate([rows["val"]["sirna"].to_numpy(), rows["test"]["sirna_true"].to_numpy()])
    return Wells(keep=keep, id_code=both["id_code"].to_numpy(),
                 experiment=both["experiment"].to_numpy(), plate=both["plate"].to_numpy(),
                 cell_type=both["cell_type"].to_numpy(), label=label.astype(np.int64),
                 n_val=len(rows["val"]), ignored_controls=ignored)


def check_same_wells(first: WellSums, other: WellSums, parts: Sequence[str] = ("val", "test"),
                     same_width: bool = True) -> None:
    import numpy as np

    if same_width and other.n_classes != first.n_classes:
        raise SubmissionError(f"{other.path} has {other.n_classes} classes per vector but "
                              f"{first.path} has {first.n_classes}: files of different models/class sets")
    for part in parts:
        a, b = first.ids[part], other.ids[part]
        if not np.array_equal(a, b):
            only = np.setdiff1d(b, a)
            only = only if only.size else np.setdiff1d(a, b)
            raise SubmissionError(f"{other.path} holds different {part} wells than {first.path} "
                                  f"({len(b)} vs {len(a)} wells; e.g. {first_example(only)} is in one only)")


# ------------------------------------------------------------------------- the stages' input


class Stopwatch:
    """Wall and CPU seconds per phase, for the JSON report (where the time goes)."""

    def __init__(self) -> None:
        self.phases: dict = {}
        self._last = (time.perf_counter(), time.process_time())

    def lap(self, phase: str) -> None:
        now = (time.perf_counter(), time.process_time())
        wall, cpu = self.phases.get(phase, (0.0, 0.0))
        self.phases[phase] = (round(wall + now[0] - self._last[0], 3), round(cpu + now[1] - self._last[1], 3))
        self._last = now


def class_masks(structure: Structure, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(plate-group masks over `n_classes` columns, the treatment classes): the candidates."""
    import numpy as np

    masks = np.zeros((structure.n_groups, n_classes), dtype=bool)
    for g, classes in enumerate(structure.groups):
        masks[g, classes] = True
    return masks, np.flatnonzero(masks.any(axis=0))


@dataclass
class Ensemble:
    """The files' weighted mean per treatment well, and what goes with it."""
    wells: Wells
    board: Scoreboard
    scores: np.ndarray        # float32 [wells, classes]
    masks: np.ndarray         # plate groups over the classes
    treatment: np.ndarray     # the classes treatment wells may get
    extra: dict = field(default_factory=dict)  # what the report adds for this path (kNN settings)


# ---------------------------------------------------------------------------------- scoring


@dataclass
class Scoreboard:
    """Accuracy per stage, per cell type and overall, on the wells whose label is known."""
    wells: Wells
    rows: dict = field(init=False)               # split -> scored row indices
    scored: np.ndarray = field(init=False)       # val rows, then test rows: the order of `add`
    stages: list = field(default_factory=list)

    def __post_init__(self) -> None:
        import numpy as np

        labelled = self.wells.label >= 0
        val = np.arange(self.wells.n) < self.wells.n_val
        self.rows = {"val": np.flatnonzero(labelled & val), "test": np.flatnonzero(labelled & ~val)}
        self.scored = np.concatenate([self.rows["val"], self.rows["test"]])

    def add(self, name: str, predicted: np.ndarray) -> None:
        """Record a stage from the predicted labels of the scored rows (val rows, then test rows)."""
        entry: dict = {"stage": name}
        start = 0
        for split, idx in self.rows.items():
            guess, start = predicted[start:start + len(idx)], start + len(idx)
            if idx.size == 0:
                entry[split] = None
                continue
            correct = guess == self.wells.label[idx]
            cells = self.wells.cell_type[idx]
            entry[split] = {c: float(correct[cells == c].mean()) for c in sorted(set(cells.tolist()))}
            entry[split]["all"] = float(correct.mean())
        self.stages.append(entry)

    @staticmethod
    def table_of(stages: list, split: str, title: str) -> str:
        """The accuracy table of one split, as printed."""
        entries = [e for e in stages if e.get(split)]
        if not entries:
            return f"{title}: no labelled wells to score"
        columns = list(entries[0][split])
        width = max(len(e["stage"]) for e in entries) + 2
        lines = [title, "stage".ljust(width) + "".join(c.rjust(9) for c in columns)]
        for e in entries:
            lines.append(e["stage"].ljust(width) + "".join(f"{e[split][c]:9.4f}" for c in columns))
        return "\n".join(lines)


def argmax_over(scores: np.ndarray, rows: np.ndarray, classes: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Best class among `classes` for each of `rows`, in blocks (no full copy of the matrix)."""
    import numpy as np

    # contiguous classes (the usual layout: treatments first) are a view, not a copy
    columns = (slice(int(classes[0]), int(classes[-1]) + 1)
               if len(classes) and classes[-1] - classes[0] + 1 == len(classes) else classes)
    out = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), chunk):
        block = scores[rows[start:start + chunk]][:, columns]
        out[start:start + chunk] = classes[np.argmax(block, axis=1)]
    return out


def plate_group_report(wells: Wells, well_groups: np.ndarray, class_group: np.ndarray) -> dict:
    """Plates whose inferred group matches their labelled wells, per split."""
    import numpy as np

    from cellpaint.submission import plates

    plate = plates.plate_ids(wells.experiment, wells.plate)
    labelled = wells.label >= 0
    wrong = np.zeros(plate.max(initial=-1) + 1, dtype=bool)
    seen = np.zeros_like(wrong)
    seen[plate[labelled]] = True
    wrong[plate[labelled & (class_group[np.maximum(wells.label, 0)] != well_groups)]] = True
    val_plate = np.zeros_like(wrong)
    val_plate[plate[: wells.n_val]] = True
    return {split: {"correct": int((seen & ~wrong & sel).sum()), "total": int((seen & sel).sum())}
            for split, sel in (("val", val_plate), ("test", ~val_plate))}
