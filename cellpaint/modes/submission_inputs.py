"""The wells of prediction files, matched to the metadata: what a submission is made from.

`matched_files` reads the files one at a time (the logits path, submission.py, and the kNN path,
knn_submission.py, share it): the first file's wells become the `Wells` every stage works on (val
wells first, then test wells), and each other file must hold the same wells. Files that do not
match the metadata or each other are refused (`SubmissionError`, one line naming the file); with
--knn the embeddings files' 'train' part is matched the same way into the `Reference` wells the
neighbours come from.

numpy and pandas are imported inside the functions: make_submission.py sets the BLAS thread
count before anything imports numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from cellpaint.core.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cellpaint.data.structure import Structure
    from cellpaint.data.prediction_file import WellSums


class SubmissionError(InputError, ValueError):
    """Prediction files that cannot make a submission with this metadata, named in one line."""


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


@dataclass
class Reference:
    """The labelled training wells of an embeddings file's 'train' part: the kNN neighbours."""
    keep: np.ndarray       # positions of the treatment wells in the part (controls are never candidates)
    cell_type: np.ndarray  # per kept well
    label: np.ndarray
    ignored_controls: int
    experiment: np.ndarray | None = None  # per kept well
    plate: np.ndarray | None = None


def first_example(values: np.ndarray) -> str:
    return repr(str(values[0])) if len(values) else ""


def _treatment_rows(first: WellSums, wells_table: pd.DataFrame, part: str,
                    holding: str = "predictions") -> tuple[np.ndarray, pd.DataFrame, int]:
    """The metadata rows of one part's wells, checked to be known and of the part's split:
    (positions of the treatment wells in the part, their metadata rows, the control wells left out)."""
    import numpy as np
    import pandas as pd

    from cellpaint.data.metadata import TREATMENT

    name, ids = first.path, first.ids[part]
    pos = pd.Index(wells_table["id_code"]).get_indexer(ids)
    if (pos < 0).any():
        unknown = ids[pos < 0]
        raise SubmissionError(f"{name}: {len(unknown)} {part} well(s) are not in the metadata "
                              f"(e.g. {first_example(unknown)}): do the {holding} belong to this --data?")
    meta = wells_table.iloc[pos]
    split = "test" if part == "test" else "train"
    # a val part holds wells of train experiments (of val experiments in RxRx1-WILDS), a test part of test ones
    wrong = (meta["split"].to_numpy() == "test") != (part == "test")
    if wrong.any():
        raise SubmissionError(f"{name}: its {part} part holds {int(wrong.sum())} well(s) of "
                              f"{'train' if split == 'test' else 'test'} experiments "
                              f"(e.g. {first_example(ids[wrong])})")
    treatment = (meta["well_type"] == TREATMENT).to_numpy()  # controls are never candidates
    return np.flatnonzero(treatment), meta[treatment], int((~treatment).sum())


def match_metadata(first: WellSums, wells_table: pd.DataFrame) -> Wells:
    """Map the first file's wells onto the metadata and check they are the ones a submission needs."""
    import numpy as np
    import pandas as pd

    from cellpaint.data.metadata import TREATMENT

    name = first.path
    keep, rows = {}, {}
    ignored = 0
    for part in ("val", "test"):
        keep[part], rows[part], controls = _treatment_rows(first, wells_table, part)
        ignored += controls
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


def match_reference(first: WellSums, table: pd.DataFrame, structure: Structure) -> Reference:
    """Map the 'train' part onto the metadata as `match_metadata` maps val and test: labels come
    from there, never from the file."""
    import numpy as np

    keep, rows, ignored = _treatment_rows(first, table, "train", holding="embeddings")
    label = rows["sirna"].to_numpy()
    bad = ~np.isin(label, structure.treatment_classes)
    if bad.any():
        raise SubmissionError(f"{first.path}: {int(bad.sum())} train well(s) have no treatment label in the "
                              f"metadata (e.g. {first_example(rows['id_code'].to_numpy()[bad])})")
    return Reference(keep=keep, cell_type=rows["cell_type"].to_numpy(), label=label.astype(np.int64),
                     ignored_controls=ignored, experiment=rows["experiment"].to_numpy(),
                     plate=rows["plate"].to_numpy())


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


def matched_files(paths: Sequence[str], table: pd.DataFrame, parts: Sequence[str], lap: Callable[[str], None],
                  check: Callable[[int, WellSums], None] | None = None,
                  same_width: bool = True) -> Iterator[tuple[int, WellSums, Wells]]:
    """(index, per-well sums, the wells) of each file in turn: the first file's wells matched to
    the metadata, every other file checked to hold the same wells in `parts` (and, with
    `same_width`, vectors of the same length). `check(index, sums)` looks at each file first;
    `lap` times the reading (Stopwatch.lap).

    One file's sums are read at a time: the caller reduces them (and empties them) before the next.
    """
    from cellpaint.data.prediction_file import load_well_sums

    first = wells = None
    for i, path in enumerate(paths):
        sums = load_well_sums(path, parts)
        lap("read files")
        if check is not None:
            check(i, sums)
        if first is None:
            first, wells = sums, match_metadata(sums, table)
        else:
            check_same_wells(first, sums, parts, same_width)
        yield i, sums, wells
