"""The submission mode: prediction files -> per-well scores -> plate stages -> the CSV and its report.

Per file the sites of a well are summed; the files are ensembled (weighted) — or, with `knn`, the
embeddings files are scored by their nearest training wells (knn_submission.py) — and then, using
the plate design of the metadata (cellpaint/data/plates.py):
  1. per experiment, which plate group each plate holds (best joint ordering),
  2. only that group's classes stay candidates,
  3. per plate, a linear assignment so each class goes to at most one well.
Validation accuracy (wells of the files' 'val' part, labels from the metadata) is recorded after
every stage, per cell type, and test accuracy too where the metadata knows test labels.

numpy is imported inside the functions: make_submission.py sets the BLAS thread count first.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cellpaint.core.errors import UsageError
from cellpaint.core.settings import SubmissionSettings
from cellpaint.modes.scoreboard import Ensemble, Scoreboard, Stopwatch, argmax_over, plate_group_report
from cellpaint.modes.submission_inputs import SubmissionError, matched_files

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cellpaint.data.structure import Structure


def ensemble_files(files: tuple[str, ...], weights: list[float], table: pd.DataFrame, structure: Structure,
                   clock: Stopwatch) -> Ensemble:
    """Read the files one at a time into a running weighted sum, scoring each on the way.

    Only one file's scores are in memory at once besides the sum: each is reduced to per-well
    sums on load (prediction_file.load_well_sums), scaled in place and added.
    """
    import numpy as np

    from cellpaint.data.prediction_file import ROW_ORDER

    def enough_classes(i: int, sums) -> None:
        if i == 0 and sums.n_classes < structure.n_classes:
            raise SubmissionError(f"{sums.path} has {sums.n_classes} classes per vector but the metadata "
                                  f"has {structure.n_classes}")

    board = total = average = masks = treatment = wells = None
    for i, sums, wells in matched_files(files, table, ROW_ORDER, clock.lap, enough_classes):
        if i == 0:
            board = Scoreboard(wells)
            masks, treatment = structure.group_masks(sums.n_classes), structure.treatment_classes
            if len(set(weights)) > 1:  # the plain average differs: keep it, for the scored rows only
                average = np.zeros((len(board.scored), sums.n_classes), dtype=np.float32)
        # the file's treatment wells in row order: its own matrix unless it has control wells to drop
        block = sums.matrix if wells.ignored_controls == 0 else np.concatenate(
            [sums.sums[part][wells.keep[part]] for part in ("val", "test")])
        sums.sums, sums.matrix = {}, None  # the first file is kept for its ids only
        del sums
        board.add(f"file {i + 1}: {Path(files[i]).name}", argmax_over(block, board.scored, treatment))
        if average is not None:
            average += block[board.scored]
        if weights[i] != 1:
            block *= np.float32(weights[i])
        if total is None:
            total = block  # adopted, not copied: one full-size matrix less
        else:
            total += block
        del block
        clock.lap("ensemble")
    if sum(weights) != 1:  # a mean, not a sum: the softmax temperature of one model
        total *= np.float32(1 / sum(weights))
    scored = board.scored
    board.add("average", argmax_over(average, np.arange(len(scored)), treatment) if average is not None
              else argmax_over(total, scored, treatment))
    board.add("ensemble (w=" + ",".join(f"{w:g}" for w in weights) + ")", argmax_over(total, scored, treatment))
    clock.lap("ensemble")
    return Ensemble(wells, board, total, masks, treatment)


def plate_stages(ens: Ensemble, group_method: str, assign_scores: str, clock: Stopwatch,
                 balance: str | None = None, balance_iters: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Group inference, group restriction, (with `balance`) each plate's probabilities balanced,
    and per-plate assignment; returns (groups, labels).

    After the group inference every well competes only for its group's classes, so the later
    stages run on compact [wells, group size] blocks (plates.split_by_group), not on full-width
    rows that would be three quarters -inf.
    """
    import numpy as np

    from cellpaint.data import plates

    wells, board = ens.wells, ens.board
    groups = plates.infer_plate_groups(ens.scores, wells.experiment, wells.plate, ens.masks, group_method)
    clock.lap("group inference")
    plate = plates.plate_ids(wells.experiment, wells.plate)
    best = np.full(wells.n, -1, dtype=np.int64)
    labels = np.full(wells.n, -1, dtype=np.int64)
    balanced = np.full(wells.n, -1, dtype=np.int64)
    balance_error = 0.0
    for rows, classes, block in plates.split_by_group(ens.scores, groups, ens.masks):
        best[rows] = classes[np.argmax(block, axis=1)]
        if assign_scores != "logits":
            plates.log_softmax(block, out=block)
            if balance is not None:  # balanced as probabilities, kept as their logs
                block, error = plates.balance_plates(block, plate[rows], balance, balance_iters)
                balance_error = max(balance_error, error)
                balanced[rows] = classes[np.argmax(block, axis=1)]
            if assign_scores == "prob":
                np.exp(block, out=block)
        found = plates.assign_plates(block, plate[rows], fill_unassigned=True)
        labels[rows] = np.where(found >= 0, classes[found], -1)
    ens.scores = None  # the full matrix is no longer needed
    if (labels < 0).any():
        raise SubmissionError(f"{int((labels < 0).sum())} well(s) got no class: their plate group is empty")
    board.add(f"groups ({group_method})", best[board.scored])
    if balance is not None:
        board.add(f"balance ({balance_name(balance, balance_iters)})", balanced[board.scored])
        # only when asked: the report of a run without it stays as it was
        ens.extra["balance"] = {"method": balance_name(balance, balance_iters),
                                "largest_column_error": balance_error}
    board.add(f"assignment ({assign_scores})", labels[board.scored])
    clock.lap("restriction and assignment")
    return groups, labels


def balance_name(balance: str, iterations: int) -> str:
    return f"sinkhorn,{iterations}" if balance == "sinkhorn" else balance


def build(s: SubmissionSettings) -> tuple[str, dict]:
    """Everything but the writing: the CSV text and the report (as written to the JSON)."""
    clock = Stopwatch()
    import numpy as np

    from cellpaint.data import metadata, plates
    from cellpaint.data.structure import derive_structure

    weights = list(s.weights) if s.weights is not None else [1.0] * len(s.files)
    if len(weights) != len(s.files):
        raise UsageError(f"-w/--weights gives {len(weights)} weight(s) for {len(s.files)} prediction file(s)")
    for path in s.files:  # fail before the slow part when a file is simply not there
        if not Path(path).is_file():
            raise SubmissionError(f"prediction file {path} does not exist")
    if Path(s.output).is_dir():
        raise UsageError(f"-o/--output {s.output} is a directory")
    table = metadata.load_wells(Path(s.data))
    if not ((table["split"] == "test") & (table["well_type"] == metadata.TREATMENT)).any():
        raise SubmissionError(f"{s.data}: the metadata has no test wells (a test.csv with only its header?): "
                              "a submission of them would be a header alone")
    structure = derive_structure(table)
    if structure.n_groups == 0:
        raise SubmissionError(f"{s.data}: the metadata defines no plate groups (no labelled treatment wells)")
    clock.lap("metadata")

    if s.knn is not None:
        from cellpaint.modes.knn_submission import knn_ensemble
        ens = knn_ensemble(s, weights, table, structure, clock)
    else:
        ens = ensemble_files(s.files, weights, table, structure, clock)
    groups, labels = plate_stages(ens, s.group_method, s.assign_scores, clock, s.balance, s.balance_iters)

    wells, board = ens.wells, ens.board
    test = np.arange(wells.n_val, wells.n)
    test = test[np.argsort(wells.id_code[test], kind="stable")]
    csv = "id_code,sirna\n" + "".join(f"{i},{l}\n" for i, l in zip(wells.id_code[test].tolist(),
                                                                     labels[test].tolist()))
    test_groups: dict = {}
    for e, p, g in sorted(set(zip(wells.experiment[test].tolist(), wells.plate[test].tolist(),
                                  groups[test].tolist()))):
        test_groups.setdefault(e, {})[str(p)] = g
    report = {
        "files": [str(p) for p in s.files], "weights": weights, "data": str(s.data),
        "group_method": s.group_method, "assign_scores": s.assign_scores,
        "wells": {"val": len(board.rows["val"]), "test": wells.n - wells.n_val,
                  "test_labelled": len(board.rows["test"]), "ignored_controls": wells.ignored_controls},
        "plate_groups_correct": plate_group_report(wells, groups, plates.class_groups(ens.masks)),
        "stages": board.stages, "test_plate_groups": test_groups, **ens.extra,
    }
    clock.lap("outputs")
    report["timings"] = {phase: {"wall_s": w, "cpu_s": c} for phase, (w, c) in clock.phases.items()}
    return csv, report
