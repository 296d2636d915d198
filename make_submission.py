#!/usr/bin/env python3
"""Build a submission from one or more prediction files (SPEC, "Submission").

    ./make_submission.py -o sub.csv [--data DIR] [-w W1,W2,...] [-t THREADS] FILE [FILE ...]
    ./make_submission.py --knn K [--use-valid] [--knn-search group|cell] [--knn-weight sigmoid|relu-cos]
                         [--knn-combine mean|concat] -o sub.csv [--data DIR] [-w ...] EMB_FILE [EMB_FILE ...]

Per file the sites of a well are summed; the files are ensembled (weighted); then, using the
plate design of the metadata (plates.py):
  1. per experiment, which plate group each plate holds (best joint ordering),
  2. only that group's classes stay candidates,
  3. per plate, a linear assignment so each class goes to at most one well.
Validation accuracy (wells of the files' 'val' part, labels from the metadata) is printed after
every stage, per cell type, and test accuracy too where the metadata knows test labels. The CSV
(`id_code,sirna`, every test treatment well once) and the same scores as JSON (`<output>.json`)
are written only once everything has succeeded.

With --knn the files are embeddings files (main.py --mode predict --save-embeddings) and the
scores come from the 41st-place recipe instead of logits: each val/test well is scored by its
K nearest labelled training wells of the same cell type in each plate group (knn.py,
knn_submission.py); the plate stages are the same, the group evidence the weighted mode.

torch is never imported and numpy only after the thread count is set: this is a small,
fast program (a few seconds on full-size predictions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # imported in main(), after the BLAS thread variables are set
    import numpy as np
    import pandas as pd

    from cellpaint.data.structure import Structure

from cellpaint.modes.methods import (ASSIGN_SCORES, GROUP_METHODS, KNN_COMBINES, KNN_SEARCHES,  # noqa: E402
                                          KNN_WEIGHTS)
from cellpaint.modes.scoreboard import Scoreboard, Stopwatch, argmax_over, plate_group_report  # noqa: E402
from cellpaint.modes.submission_inputs import Ensemble, SubmissionError, check_same_wells, match_metadata  # noqa: E402

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ensemble prediction files and build a plate-consistent submission CSV.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="prediction files (main.py --mode predict)")
    parser.add_argument("-o", "--output", required=True, help="submission CSV to write (scores go to <output>.json)")
    parser.add_argument("--data", default="../data", help="data directory (competition or release layout)")
    parser.add_argument("-w", "--weights", help="comma-separated ensemble weights, one per file (default: equal)")
    parser.add_argument("-t", "--threads", type=int, help="numpy/BLAS threads (default: the library's choice)")
    parser.add_argument("--group-method", choices=GROUP_METHODS,
                        help="plate-group evidence: summed class probabilities ('prob', the default for "
                             "logits), arg-max counts, or with --knn 'mode' (the default there): the mean "
                             "over the plate's wells of the group's best summed vote, the weighted mode")
    parser.add_argument("--assign-scores", choices=ASSIGN_SCORES, default="logsoftmax",
                        help="scores maximised by the per-plate assignment (default: log-softmax)")
    parser.add_argument("--knn", metavar="K",
                        help="the files are embeddings files: classify each well by its K nearest training "
                             "wells of its cell type; K for all, K1,K2,... in sorted cell-type order, or "
                             "TYPE=K,... (e.g. 30,100,30,15 or HEPG2=30,HUVEC=100,RPE=30,U2OS=15)")
    parser.add_argument("--use-valid", action="store_true",
                        help="with --knn: test wells also get the labelled val wells as neighbours "
                             "(val wells are still scored against the training wells only)")
    parser.add_argument("--knn-search", choices=KNN_SEARCHES,
                        help="with --knn: find the K nearest among each plate group's training wells "
                             "separately ('group', the default, as the 41st place) or among all wells of "
                             "the cell type ('cell')")
    parser.add_argument("--knn-weight", choices=KNN_WEIGHTS,
                        help="with --knn: a neighbour's vote, sigmoid(cosine) ('sigmoid', the default, as "
                             "the 41st place) or max(cosine, 0) ('relu-cos')")
    parser.add_argument("--knn-combine", choices=KNN_COMBINES,
                        help="with --knn and several files: average the files' vectors, then normalise "
                             "('mean', the 41st place's; the default when all files have one width), or "
                             "normalise each and concatenate ('concat'; the default for different widths)")
    args = parser.parse_args(argv)
    for flag in ("use_valid", "knn_search", "knn_weight", "knn_combine"):
        if getattr(args, flag) not in (None, False) and args.knn is None:
            parser.error(f"--{flag.replace('_', '-')} only applies with --knn")
    if args.group_method == "mode" and args.knn is None:
        parser.error("--group-method mode only applies with --knn (it reads kNN votes)")
    args.group_method = args.group_method or ("mode" if args.knn is not None else "prob")
    args.knn_search = args.knn_search or "group"
    args.knn_weight = args.knn_weight or "sigmoid"
    return args


def parse_weights(text: str | None, n_files: int) -> list[float]:
    if text is None:
        return [1.0] * n_files
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise SubmissionError(f"-w/--weights: {text!r} is not a comma-separated list of numbers") from None
    if len(weights) != n_files:
        raise SubmissionError(f"-w/--weights gives {len(weights)} weight(s) for {n_files} prediction file(s)")
    if any(not (w >= 0 and w < float("inf")) for w in weights) or not sum(weights) > 0:
        raise SubmissionError(f"-w/--weights must be finite, non-negative and not all zero, got {text!r}")
    return weights


# ------------------------------------------------------------------------------- the pipeline


def ensemble_files(files: list[str], weights: list[float], table: pd.DataFrame, structure: Structure,
                   clock: Stopwatch) -> Ensemble:
    """Read the files one at a time into a running weighted sum, scoring each on the way.

    Only one file's scores are in memory at once besides the sum: each is reduced to per-well
    sums on load (prediction_file.load_well_sums), scaled in place and added.
    """
    import numpy as np

    from cellpaint.data.prediction_file import load_well_sums

    first = wells = board = total = average = masks = treatment = None
    for i, (path, weight) in enumerate(zip(files, weights)):
        sums = load_well_sums(path)
        clock.lap("read files")
        if first is None:
            if sums.n_classes < structure.n_classes:
                raise SubmissionError(f"{path} has {sums.n_classes} classes per vector but the metadata "
                                      f"has {structure.n_classes}")
            first, wells = sums, match_metadata(sums, table)
            board = Scoreboard(wells)
            masks, treatment = structure.group_masks(sums.n_classes), structure.treatment_classes
            if len(set(weights)) > 1:  # the plain average differs: keep it, for the scored rows only
                average = np.zeros((len(board.scored), sums.n_classes), dtype=np.float32)
        else:
            check_same_wells(first, sums)
        # the file's treatment wells in row order: its own matrix unless it has control wells to drop
        block = sums.matrix if wells.ignored_controls == 0 else np.concatenate(
            [sums.sums[part][wells.keep[part]] for part in ("val", "test")])
        sums.sums, sums.matrix = {}, None  # the first file is kept for its ids only
        del sums
        board.add(f"file {i + 1}: {Path(path).name}", argmax_over(block, board.scored, treatment))
        if average is not None:
            average += block[board.scored]
        if weight != 1:
            block *= np.float32(weight)
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


def plate_stages(ens: Ensemble, group_method: str, assign_scores: str, clock: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
    """Group inference, group restriction and per-plate assignment; returns (groups, labels).

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
    for rows, classes, block in plates.split_by_group(ens.scores, groups, ens.masks):
        best[rows] = classes[np.argmax(block, axis=1)]
        if assign_scores != "logits":
            plates.log_softmax(block, out=block)
            if assign_scores == "prob":
                np.exp(block, out=block)
        found = plates.assign_plates(block, plate[rows], fill_unassigned=True)
        labels[rows] = np.where(found >= 0, classes[found], -1)
    ens.scores = None  # the full matrix is no longer needed
    if (labels < 0).any():
        raise SubmissionError(f"{int((labels < 0).sum())} well(s) got no class: their plate group is empty")
    board.add(f"groups ({group_method})", best[board.scored])
    board.add(f"assignment ({assign_scores})", labels[board.scored])
    clock.lap("restriction and assignment")
    return groups, labels


def build(args: argparse.Namespace) -> tuple[str, dict]:
    """Everything but the writing: the CSV text and the report (as written to the JSON)."""
    clock = Stopwatch()
    import numpy as np

    from cellpaint.data import metadata
    from cellpaint.data.structure import derive_structure
    from cellpaint.data import plates

    weights = parse_weights(args.weights, len(args.files))
    for path in args.files:  # fail before the slow part when a file is simply not there
        if not Path(path).is_file():
            raise SubmissionError(f"prediction file {path} does not exist")
    if Path(args.output).is_dir():
        raise SubmissionError(f"-o/--output {args.output} is a directory")
    table = metadata.load_wells(Path(args.data))
    structure = derive_structure(table)
    if structure.n_groups == 0:
        raise SubmissionError(f"{args.data}: the metadata defines no plate groups (no labelled treatment wells)")
    clock.lap("metadata")

    if args.knn is not None:
        from cellpaint.modes.knn_submission import knn_ensemble
        ens = knn_ensemble(args, weights, table, structure, clock)
    else:
        ens = ensemble_files(args.files, weights, table, structure, clock)
    groups, labels = plate_stages(ens, args.group_method, args.assign_scores, clock)

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
        "files": [str(p) for p in args.files], "weights": weights, "data": str(args.data),
        "group_method": args.group_method, "assign_scores": args.assign_scores,
        "wells": {"val": len(board.rows["val"]), "test": wells.n - wells.n_val,
                  "test_labelled": len(board.rows["test"]), "ignored_controls": wells.ignored_controls},
        "plate_groups_correct": plate_group_report(wells, groups, plates.class_groups(ens.masks)),
        "stages": board.stages, "test_plate_groups": test_groups, **ens.extra,
    }
    clock.lap("outputs")
    report["timings"] = {phase: {"wall_s": w, "cpu_s": c} for phase, (w, c) in clock.phases.items()}
    return csv, report


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status (cellpaint/core/errors.py, the same for every command): 0 written; 1 no submission from
    these files and this data (a CellpaintError, the one line names the file), or it could not be
    written; 2 the command line is wrong (argparse's errors, -t, -w, -o); 130 interrupted. A failure
    writes nothing: an earlier CSV and its JSON stay as they were."""
    from cellpaint.core.errors import CellpaintError, UsageError, exit_status, one_line

    def failed(e: BaseException, doing: str) -> int:
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted: {args.output} not written" if doing == "read" else
                  f"interrupted while writing {args.output}: a CSV without its .json beside it may be the old one",
                  file=sys.stderr)
        elif isinstance(e, OSError):  # an unreadable input (permissions, I/O); a full disk, a read-only directory
            name = e.filename or (args.output if doing == "write" else "an input")
            print(f"error: cannot {doing} {name}: {e.strerror or one_line(e)}", file=sys.stderr)
        else:
            print(f"error: {one_line(e)}", file=sys.stderr)
        return exit_status(e)

    args = parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"-t/--threads must be at least 1, got {args.threads}")
        try:  # the command line alone, before any file is read
            parse_weights(args.weights, len(args.files))
        except SubmissionError as e:
            raise UsageError(str(e)) from None
        if Path(args.output).is_dir():
            raise UsageError(f"-o/--output {args.output} is a directory")
        if args.threads is not None:
            for variable in _THREAD_VARIABLES:  # read by the BLAS/OpenMP runtimes when numpy loads
                os.environ[variable] = str(args.threads)
        started = time.perf_counter()
        csv, report = build(args)
    except (CellpaintError, OSError, KeyboardInterrupt) as e:
        return failed(e, "read")
    val, test = report["wells"]["val"], report["wells"]["test_labelled"]
    print(f"candidates for treatment wells: treatment classes only; {report['wells']['test']} test wells")
    if "knn" in report:
        info = report["knn"]
        print("kNN: K " + ", ".join(f"{c}={k}" for c, k in info["k"].items())
              + f"; neighbours of val wells: {info['reference_wells']['val']} training wells, of test wells: "
              + (f"those + {info['reference_wells']['test'] - info['reference_wells']['val']} val wells "
                 "(--use-valid: the val rows below do not include them)" if info["use_valid"]
                 else "the same"))
        print(f"kNN: search per {'plate group' if info['search'] == 'group' else 'cell type'}, votes "
              f"{info['weight']}" + (f", files combined by {info['combine']}" if info["combine"] else "")
              + f"; plate-group evidence: {report['group_method']}")
        for line in info["k_short"]:
            print(f"warning: {line}")
    print(Scoreboard.table_of(report["stages"], "val", f"validation accuracy ({val} wells)"))
    if test:
        print(Scoreboard.table_of(report["stages"], "test", f"test accuracy ({test} labelled wells)"))
    for split, counts in report["plate_groups_correct"].items():
        if counts["total"]:
            print(f"plate groups inferred correctly ({split}): {counts['correct']}/{counts['total']} plates")
    report["seconds"] = round(time.perf_counter() - started, 3)
    json_path = f"{args.output}.json"
    from cellpaint.core.atomic import write_with_companion
    try:  # never new scores beside an old CSV, even when killed between the two renames
        write_with_companion(args.output, csv, json_path, json.dumps(report, indent=1) + "\n")
    except (OSError, KeyboardInterrupt) as e:
        return failed(e, "write")
    print(f"wrote {args.output} and {json_path} in {report['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
