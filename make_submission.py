#!/usr/bin/env python3
"""Build a submission from one or more prediction files (SPEC, "Submission").

    ./make_submission.py -o sub.csv [--data DIR] [-w W1,W2,...] [-t THREADS] [--balance sinkhorn[,ITERS]|columns]
                         FILE [FILE ...]
    ./make_submission.py --knn K [--use-valid] [--knn-search group|cell] [--knn-weight sigmoid|relu-cos]
                         [--knn-combine mean|concat] -o sub.csv [--data DIR] [-w ...] EMB_FILE [EMB_FILE ...]

Per file the sites of a well are summed; the files are ensembled (weighted); then, using the
plate design of the metadata (plates.py):
  1. per experiment, which plate group each plate holds (best joint ordering),
  2. only that group's classes stay candidates,
  3. per plate, a linear assignment so each class goes to at most one well (with --balance, each
     plate's probabilities balanced first: plates.balance_plates).
Validation accuracy (wells of the files' 'val' part, labels from the metadata) is printed after
every stage, per cell type, and test accuracy too where the metadata knows test labels. The CSV
(`id_code,sirna`, every test treatment well once) and the same scores as JSON (`<output>.json`)
are written only once everything has succeeded.

With --knn the files are embeddings files (main.py --mode predict --save-embeddings) and the
scores come from the 41st-place recipe instead of logits: each val/test well is scored by its
K nearest labelled training wells of the same cell type in each plate group (knn.py,
knn_submission.py); the plate stages are the same, the group evidence the weighted mode.

This file is the command line: it parses the flags into `SubmissionSettings` and runs the
submission mode (cellpaint/modes/submission.py). torch is never imported and numpy only after
the thread count is set: this is a small, fast program (a few seconds on full-size predictions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from cellpaint.cli import entry
from cellpaint.core.errors import InputError, Interrupted, OutputError, UsageError, one_line
from cellpaint.core.settings import (ASSIGN_SCORES, BALANCES, GROUP_METHODS, KNN_CENTERS, KNN_COMBINES, KNN_SEARCHES,
                                     KNN_WEIGHTS, SubmissionSettings)

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
    parser.add_argument("--balance", type=balance_type, metavar="sinkhorn[,ITERS]|columns",
                        help="balance each plate's class probabilities before the assignment, printed as its own "
                             "stage: sinkhorn (the 7th place: columns to n/c, then rows to 1, up to ITERS rounds, "
                             f"default {SINKHORN_ITERS}, until within 1e-9) or columns (the 4th place: each class "
                             "divided by its sum over the plate's wells); default off")
    parser.add_argument("--knn-center", choices=KNN_CENTERS,
                        help="with --knn: subtract each plate's mean embedding from its wells (then normalise "
                             "again) before the search (the 2nd place); default off")
    args = parser.parse_args(argv)
    for flag in ("use_valid", "knn_search", "knn_weight", "knn_combine", "knn_center"):
        if getattr(args, flag) not in (None, False) and args.knn is None:
            parser.error(f"--{flag.replace('_', '-')} only applies with --knn")
    if args.group_method == "mode" and args.knn is None:
        parser.error("--group-method mode only applies with --knn (it reads kNN votes)")
    if args.balance is not None and args.assign_scores == "logits":
        parser.error("--balance balances probabilities: use --assign-scores logsoftmax (the default) or prob")
    args.group_method = args.group_method or ("mode" if args.knn is not None else "prob")
    args.knn_search = args.knn_search or "group"
    args.knn_weight = args.knn_weight or "sigmoid"
    return args


SINKHORN_ITERS = 1000


def balance_type(text: str) -> tuple[str, int]:
    """--balance sinkhorn[,ITERS] | columns as (method, rounds)."""
    method, _, iterations = text.partition(",")
    if method not in BALANCES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected sinkhorn[,ITERS] or columns")
    if method == "columns":
        if iterations:
            raise argparse.ArgumentTypeError(f"{text!r}: columns takes no rounds")
        return method, 0
    if not iterations:
        return method, SINKHORN_ITERS
    if not iterations.isdigit() or not 1 <= int(iterations) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r}: ITERS must be a whole number in [1, 1000000]")
    return method, int(iterations)


def parse_weights(text: str | None, n_files: int) -> tuple[float, ...] | None:
    """-w/--weights as numbers, one per file (None: equal weights); a UsageError says what is wrong."""
    if text is None:
        return None
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise UsageError(f"-w/--weights: {text!r} is not a comma-separated list of numbers") from None
    if len(weights) != n_files:
        raise UsageError(f"-w/--weights gives {len(weights)} weight(s) for {n_files} prediction file(s)")
    return weights  # each weight's domain is declared on SubmissionSettings (core/bounds.py)


def settings_from_args(args: argparse.Namespace) -> SubmissionSettings:
    """The command line as settings (a UsageError names a flag that cannot work: -t, -w, -o)."""
    weights = parse_weights(args.weights, len(args.files))  # the command line alone, before any file is read
    if Path(args.output).is_dir():
        raise UsageError(f"-o/--output {args.output} is a directory")
    s = SubmissionSettings(files=tuple(args.files), output=args.output, data=Path(args.data), weights=weights,
                           group_method=args.group_method, assign_scores=args.assign_scores, knn=args.knn,
                           use_valid=args.use_valid, knn_search=args.knn_search, knn_weight=args.knn_weight,
                           knn_combine=args.knn_combine, threads=args.threads,
                           balance=args.balance[0] if args.balance else None,
                           balance_iters=args.balance[1] if args.balance else 0, knn_center=args.knn_center)
    if weights is not None and not sum(weights) > 0:
        raise UsageError(f"-w/--weights must not be all zero, got {args.weights!r}")
    return s


def print_report(report: dict) -> None:
    """The accuracy tables and what the kNN path used, as printed."""
    from cellpaint.modes.scoreboard import Scoreboard

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
        if info.get("center"):
            print(f"kNN: embeddings centred per {info['center']} (its mean subtracted), then normalised again")
        for line in info["k_short"]:
            print(f"warning: {line}")
        if info.get("zero_wells"):
            print(f"warning: {info['zero_wells']} val/test well(s) have an all-zero embedding (no readable image "
                  "when predicted?): their neighbours, and so their classes, are arbitrary")
    if "balance" in report:
        print(f"balance: {report['balance']['method']} on each plate's probabilities; largest difference of a "
              f"class's sum from its target {report['balance']['largest_column_error']:.2g}")
    print(Scoreboard.table_of(report["stages"], "val", f"validation accuracy ({val} wells)"))
    if test:
        print(Scoreboard.table_of(report["stages"], "test", f"test accuracy ({test} labelled wells)"))
    for split, counts in report["plate_groups_correct"].items():
        if counts["total"]:
            print(f"plate groups inferred correctly ({split}): {counts['correct']}/{counts['total']} plates")


def submit(args: argparse.Namespace) -> None:
    """Build the submission and write the CSV with its JSON scores beside it: both, or neither
    (an earlier CSV and its JSON stay as they were)."""
    s = settings_from_args(args)
    if s.threads is not None:
        for variable in _THREAD_VARIABLES:  # read by the BLAS/OpenMP runtimes when numpy loads
            os.environ[variable] = str(s.threads)
    started = time.perf_counter()
    from cellpaint.core.outputs import check_not_inputs
    from cellpaint.data.metadata import input_files
    from cellpaint.modes.submission import build

    inputs = {**{str(p): "the metadata of --data" for p in input_files(s.data)},
              **{f: "a prediction file" for f in s.files}}
    check_not_inputs([s.output, f"{s.output}.json"], inputs, "make_submission.py -o")

    try:
        csv, report = build(s)
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted: {s.output} not written", e) from None
    except OSError as e:  # an input without read permission, an I/O error
        raise InputError(f"cannot read {e.filename or 'an input'}: {e.strerror or one_line(e)}") from None
    print_report(report)
    report["seconds"] = round(time.perf_counter() - started, 3)
    json_path = f"{s.output}.json"
    from cellpaint.core.atomic import write_with_companion
    try:  # never new scores beside an old CSV, even when killed between the two renames
        write_with_companion(s.output, csv, json_path, json.dumps(report, indent=1) + "\n")
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted while writing {s.output}: a CSV without its .json beside it may be "
                          "the old one", e) from None
    except OSError as e:  # a full disk, a read-only directory
        raise OutputError(f"cannot write {e.filename or s.output}: {e.strerror or one_line(e)}") from None
    print(f"wrote {s.output} and {json_path} in {report['seconds']:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status (cellpaint/core/errors.py, the same for every command): 0 written; 1 no submission
    from these files and this data (the one line names the file), or it could not be written; 2 the
    command line is wrong (argparse's errors, -t, -w, -o); 130 interrupted, 143 terminated. A
    failure writes nothing: an earlier CSV and its JSON stay as they were."""
    args = parse_args(argv)
    return entry.run(lambda: submit(args))


if __name__ == "__main__":
    sys.exit(main())
