"""make_submission.py --knn: embeddings files -> kNN class scores for the plate stages.

The 41st-place recipe's scoring (knn.py does the arithmetic): each embeddings file's wells are
matched to the metadata (the 'train' part becomes the labelled reference wells, labels always
from the metadata), its sites summed, the files combined (`--knn-combine`), and each val/test
well scored by its K nearest reference wells of its cell type, searched per plate group
(`--knn-search group`, the original's) or over the whole cell type (`cell`). The plate stages
(group inference, restriction, assignment) are submission.py's, shared with the logits path.

numpy is imported inside the functions: make_submission.py sets the BLAS thread count first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellpaint.core.settings import SubmissionSettings
from cellpaint.modes.scoreboard import Ensemble, Scoreboard, Stopwatch, argmax_over
from cellpaint.modes.submission_inputs import Reference, SubmissionError, Wells, match_reference, matched_files

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cellpaint.data.structure import Structure
    from cellpaint.data.prediction_file import WellSums


@dataclass
class KnnSetup:
    """What every kNN run of one submission shares."""
    k: dict                 # cell type -> K asked for
    n_ref: int              # feature rows [0, n_ref) are the reference wells, then the wells' rows
    ref: Reference
    wells: Wells
    n_classes: int
    treatment: np.ndarray
    use_valid: bool
    class_group: np.ndarray | None = None  # plate group per class: search per group; None: per cell type
    weight: str = "sigmoid"

    def scores(self, features: np.ndarray, rows: np.ndarray,
               out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """kNN scores of wells `rows` (val rows first, then test rows) and the K used per split.

        Val wells are compared with the training wells only, so their accuracy stays an honest
        estimate (the original did the same); with --use-valid the test wells also get the
        labelled val wells, which sit right after the training wells in `features` (a view).
        """
        import numpy as np

        from cellpaint.modes import knn

        if out is None:
            out = np.empty((len(rows), self.n_classes), dtype=np.float32)
        wells, n_val = self.wells, self.wells.n_val
        n_v = int((rows < n_val).sum())
        used = {}
        splits = (("val", slice(0, n_v), 0), ("test", slice(n_v, len(rows)), n_val * self.use_valid))
        for split, sel, extra in splits:  # extra: the val wells that join the reference
            q = rows[sel]
            if q.size == 0:
                continue
            labels = np.concatenate([self.ref.label, wells.label[:extra]])
            _, used[split] = knn.knn_scores(
                features[self.n_ref + q], wells.cell_type[q], features[:self.n_ref + extra],
                np.concatenate([self.ref.cell_type, wells.cell_type[:extra]]), labels,
                self.k, self.n_classes, self.treatment,
                reference_groups=None if self.class_group is None else self.class_group[labels],
                weight=self.weight, out=out[sel])
        return out, used


def short_of_k(k: dict, used: dict) -> list[str]:
    """One line per split and cell type whose K was larger than a searched set of wells."""
    lines = []
    for split, per_cell in used.items():
        for cell, got in per_cell.items():
            if isinstance(got, dict):
                lines.extend(f"{split} {cell}, plate group {g}: K {k[cell]} > its {n} reference wells, all used"
                             for g, n in got.items() if n < k[cell])
            elif got < k[cell]:
                lines.append(f"{split} {cell}: K {k[cell]} > its {got} reference wells per searched set, all used")
    return lines


def _vectors(sums: WellSums, ref: Reference, wells: Wells) -> np.ndarray:
    """Reference rows, then the wells' rows (val, test): the file's own matrix unless controls go."""
    import numpy as np

    if len(ref.keep) == len(sums.ids["train"]) and wells.ignored_controls == 0:
        return sums.matrix
    return np.concatenate([sums.sums["train"][ref.keep], sums.sums["val"][wells.keep["val"]],
                           sums.sums["test"][wells.keep["test"]]])


def _check_zero_rows(vectors: np.ndarray, sums: WellSums, n_ref: int) -> int:
    """Refuse a file whose embeddings are all zero, or whose reference (train) wells include one
    (a neighbour without a direction: predict never writes one); return how many val/test wells
    are all zero (what predict writes for a well without a readable image), for a warning."""
    zero = ~vectors.any(axis=1)
    if zero.all():
        raise SubmissionError(f"{sums.path}: every embedding is all zero: nothing to find neighbours by")
    if zero[:n_ref].any():
        raise SubmissionError(f"{sums.path}: {int(zero[:n_ref].sum())} train (reference) well(s) have an all-zero "
                              "embedding: a neighbour without a direction")
    return int(zero[n_ref:].sum())


def knn_ensemble(s: SubmissionSettings, weights: list[float], table: pd.DataFrame, structure: Structure,
                 clock: Stopwatch) -> Ensemble:
    """The --knn path up to the plate stages: embeddings files -> per-well vectors (sites summed)
    -> one unit vector per well (--knn-combine: the files' weighted mean, then L2-normalised, or
    each L2-normalised and concatenated, see knn.concatenate) -> kNN scores.

    Stages: each file alone (when there are several; scored wells only), then the combination.
    """
    import numpy as np

    from cellpaint.data.prediction_file import EMBEDDING_ROWS
    from cellpaint.data import plates
    from cellpaint.modes import knn

    k = knn.parse_k(s.knn, structure.cell_types)
    masks, treatment = structure.group_masks(), structure.treatment_classes
    class_group = plates.class_groups(masks) if s.knn_search == "group" else None
    setup = board = ref = wells = None
    raw = []
    zero_wells = 0

    def has_train_part(_: int, sums: WellSums) -> None:
        if sums.ids["train"].size == 0:
            raise SubmissionError(f"{sums.path} has no 'train' part (the labelled training wells the neighbours "
                                  "come from): --knn needs embeddings files from main.py --mode predict "
                                  "--save-embeddings")

    def unit_rows(x: np.ndarray) -> np.ndarray:
        """Unit rows for the search (--knn-center plate: centred per plate first, normalised again)."""
        if s.knn_center is None:
            return x
        plate = plates.plate_ids(np.concatenate([ref.experiment, wells.experiment]),
                                 np.concatenate([ref.plate, wells.plate]))
        return knn.l2_normalise(knn.center_by_group(x, plate))

    for i, sums, wells in matched_files(s.files, table, EMBEDDING_ROWS, clock.lap, has_train_part, same_width=False):
        if i == 0:
            ref = match_reference(sums, table, structure)
            board = Scoreboard(wells)
            setup = KnnSetup(k, len(ref.keep), ref, wells, structure.n_classes, treatment, s.use_valid,
                             class_group, s.knn_weight)
            width, first_path = sums.n_classes, sums.path
        elif s.knn_combine == "mean" and sums.n_classes != width:
            raise SubmissionError(f"--knn-combine mean: {sums.path} has vectors of {sums.n_classes} values but "
                                  f"{first_path} of {width}: only --knn-combine concat joins "
                                  "files of different widths")
        raw.append(_vectors(sums, ref, wells))
        zero_wells = max(zero_wells, _check_zero_rows(raw[-1], sums, len(ref.keep)))
        sums.sums, sums.matrix = {}, None  # the first file is kept for its ids only
        if len(s.files) > 1:
            scores, _ = setup.scores(unit_rows(knn.l2_normalise(raw[-1].copy())), board.scored)
            board.add(f"file {i + 1}: {Path(s.files[i]).name}",
                      argmax_over(scores, np.arange(len(scores)), treatment))
            del scores
            clock.lap("knn")
    combine = s.knn_combine or ("mean" if len({b.shape[1] for b in raw}) == 1 else "concat")
    if len(raw) == 1:
        features = knn.l2_normalise(raw[0])
    elif combine == "mean":
        features = knn.average(raw, weights)
    else:
        features = knn.concatenate([knn.l2_normalise(b) for b in raw], weights)
    del raw
    features = unit_rows(features)
    clock.lap("normalise")
    scores, used = setup.scores(features, np.arange(setup.wells.n))
    del features
    name = "knn" + (f" {combine} (w=" + ",".join(f"{w:g}" for w in weights) + ")" if len(s.files) > 1 else "")
    board.add(name + (", test refs +val" if s.use_valid else ""), argmax_over(scores, board.scored, treatment))
    clock.lap("knn")
    extra = {"knn": {
        "k": k, "k_used": used, "k_short": short_of_k(k, used), "use_valid": s.use_valid,
        "search": s.knn_search, "weight": s.knn_weight, "combine": combine if len(s.files) > 1 else None,
        "reference_wells": {"val": setup.n_ref, "test": setup.n_ref + setup.wells.n_val * s.use_valid},
        "ignored_train_controls": ref.ignored_controls,
        **({"center": s.knn_center} if s.knn_center else {}),  # only when asked: reports stay as they were
        "features": "per file: sites summed; files " + ("averaged (weighted), then L2-normalised"
                                                        if combine == "mean" else
                                                        "L2-normalised, concatenated, scaled by sqrt(w/sum w)"),
        "votes": ("K nearest of the same cell type " + ("in each plate group" if class_group is not None
                                                         else "over all its wells")
                  + " by cosine, each voting " + ("sigmoid(cos)" if s.knn_weight == "sigmoid" else "max(cos, 0)")
                  + "; score = summed votes"),
    }}
    if zero_wells:  # only then: the report of a sound file stays as it was
        extra["knn"]["zero_wells"] = zero_wells
    return Ensemble(setup.wells, board, scores, masks, treatment, extra)
