"""The scoreboard: validation (and, where the metadata has them, test) accuracies after every
stage of a submission, how many plates got their plate group right, and where the time goes;
and the `Ensemble` the plate stages read.

numpy is imported inside the functions: make_submission.py sets the BLAS thread count before
anything imports numpy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from cellpaint.modes.submission_inputs import Wells


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


@dataclass
class Ensemble:
    """What the plate stages read, from either path (logits or kNN): the files' combined scores per
    treatment well, the scoreboard so far, and what goes with them."""
    wells: Wells
    board: Scoreboard
    scores: np.ndarray        # float32 [wells, classes]
    masks: np.ndarray         # plate groups over the classes
    treatment: np.ndarray     # the classes treatment wells may get
    extra: dict = field(default_factory=dict)  # what the report adds for this path (kNN settings)


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

    from cellpaint.data import plates

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
