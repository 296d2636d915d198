#!/usr/bin/env python3
"""Build a submission from one or more prediction files (SPEC, "Submission").

    ./make_submission.py -o sub.csv [--data DIR] [-w W1,W2,...] [-t THREADS] FILE [FILE ...]
    ./make_submission.py --knn K [--use-valid] -o sub.csv [--data DIR] [-w ...] EMB_FILE [EMB_FILE ...]

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
scores come from the 41st-place recipe instead of logits: each val/test well is classified by its
K nearest labelled training wells of the same cell type (knn.py); the plate stages are the same.

torch is never imported and numpy only after the thread count is set: this is a small,
fast program (a few seconds on full-size predictions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # imported in main(), after the BLAS thread variables are set
    import numpy as np
    import pandas as pd

    from metadata import Structure
    from predfile import WellSums

from stages import (Scoreboard, SubmissionError, Wells, argmax_over, check_same_wells, first_example,  # noqa: E402
                    match_metadata, plate_group_report)

GROUP_METHODS = ("prob", "argmax")
ASSIGN_SCORES = ("logsoftmax", "logits", "prob")
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
    parser.add_argument("--group-method", choices=GROUP_METHODS, default="prob",
                        help="plate-group evidence: summed class probabilities (default) or arg-max counts")
    parser.add_argument("--assign-scores", choices=ASSIGN_SCORES, default="logsoftmax",
                        help="scores maximised by the per-plate assignment (default: log-softmax)")
    parser.add_argument("--knn", metavar="K",
                        help="the files are embeddings files: classify each well by its K nearest training "
                             "wells of its cell type; K for all, K1,K2,... in sorted cell-type order, or "
                             "TYPE=K,... (e.g. 30,100,30,15 or HEPG2=30,HUVEC=100,RPE=30,U2OS=15)")
    parser.add_argument("--use-valid", action="store_true",
                        help="with --knn: test wells also get the labelled val wells as neighbours "
                             "(val wells are still scored against the training wells only)")
    args = parser.parse_args(argv)
    if args.use_valid and args.knn is None:
        parser.error("--use-valid only applies with --knn")
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


def ensemble_files(files: list[str], weights: list[float], table: pd.DataFrame, structure: Structure,
                   clock: Stopwatch) -> Ensemble:
    """Read the files one at a time into a running weighted sum, scoring each on the way.

    Only one file's scores are in memory at once besides the sum: each is reduced to per-well
    sums on load (predfile.load_well_sums), scaled in place and added.
    """
    import numpy as np

    from predfile import load_well_sums

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
            masks, treatment = class_masks(structure, sums.n_classes)
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


# ------------------------------------------------------------------------------- the kNN path


@dataclass
class Reference:
    """The labelled training wells of an embeddings file's 'train' part: the kNN neighbours."""
    keep: np.ndarray       # positions of the treatment wells in the part (controls are never candidates)
    cell_type: np.ndarray  # per kept well
    label: np.ndarray
    ignored_controls: int


def match_reference(first: WellSums, table: pd.DataFrame, structure: Structure) -> Reference:
    """Map the 'train' part onto the metadata: labels come from there, never from the file."""
    import numpy as np
    import pandas as pd

    from metadata import TREATMENT

    name, ids = first.path, first.ids["train"]
    pos = pd.Index(table["id_code"]).get_indexer(ids)
    if (pos < 0).any():
        unknown = ids[pos < 0]
        raise SubmissionError(f"{name}: {unknown.size} train well(s) are not in the metadata "
                              f"(e.g. {first_example(unknown)}): do the embeddings belong to this --data?")
    meta = table.iloc[pos]
    wrong = meta["split"].to_numpy() != "train"
    if wrong.any():
        raise SubmissionError(f"{name}: its train part holds {int(wrong.sum())} well(s) of test "
                              f"experiments (e.g. {first_example(ids[wrong])})")
    treatment = (meta["well_type"] == TREATMENT).to_numpy()
    label = meta["sirna"].to_numpy()[treatment]
    bad = ~np.isin(label, structure.treatment_classes)
    if bad.any():
        raise SubmissionError(f"{name}: {int(bad.sum())} train well(s) have no treatment label in the "
                              f"metadata (e.g. {first_example(ids[treatment][bad])})")
    return Reference(keep=np.flatnonzero(treatment), cell_type=meta["cell_type"].to_numpy()[treatment],
                     label=label.astype(np.int64), ignored_controls=int((~treatment).sum()))


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

    def scores(self, features: np.ndarray, rows: np.ndarray,
               out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """kNN scores of wells `rows` (val rows first, then test rows) and the K used per split.

        Val wells are compared with the training wells only, so their accuracy stays an honest
        estimate; with --use-valid the test wells also get the labelled val wells, which sit
        right after the training wells in `features` (a view, no copy).
        """
        import numpy as np

        import knn

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
            _, used[split] = knn.knn_scores(
                features[self.n_ref + q], wells.cell_type[q], features[:self.n_ref + extra],
                np.concatenate([self.ref.cell_type, wells.cell_type[:extra]]),
                np.concatenate([self.ref.label, wells.label[:extra]]),
                self.k, self.n_classes, self.treatment, out=out[sel])
        return out, used


def knn_ensemble(args: argparse.Namespace, weights: list[float], table: pd.DataFrame, structure: Structure,
                 clock: Stopwatch) -> Ensemble:
    """The --knn path up to the plate stages: embeddings files -> per-well unit vectors (sites
    summed, L2-normalised: the sum is the mean up to a factor the normalisation removes; several
    files concatenated, see knn.concatenate) -> kNN scores.

    Stages: each file alone (when there are several; scored wells only), then the combination.
    """
    import numpy as np

    import knn
    from predfile import EMBEDDING_ROWS, load_well_sums

    k = knn.parse_k(args.knn, structure.cell_types)
    masks, treatment = class_masks(structure, structure.n_classes)
    setup = board = first = None
    blocks = []
    for i, path in enumerate(args.files):
        sums = load_well_sums(path, EMBEDDING_ROWS)
        clock.lap("read files")
        if sums.ids["train"].size == 0:
            raise SubmissionError(f"{path} has no 'train' part (the labelled training wells the neighbours "
                                  "come from): --knn needs embeddings files from main.py --mode predict "
                                  "--save-embeddings")
        if first is None:
            first, wells = sums, match_metadata(sums, table)
            ref = match_reference(sums, table, structure)
            board = Scoreboard(wells)
            setup = KnnSetup(k, len(ref.keep), ref, wells, structure.n_classes, treatment, args.use_valid)
        else:
            check_same_wells(first, sums, EMBEDDING_ROWS, same_width=False)
        # reference rows, then the wells' rows (val, test): the file's own matrix unless controls go
        if len(ref.keep) == len(sums.ids["train"]) and wells.ignored_controls == 0:
            block = sums.matrix
        else:
            block = np.concatenate([sums.sums["train"][ref.keep], sums.sums["val"][wells.keep["val"]],
                                    sums.sums["test"][wells.keep["test"]]])
        sums.sums, sums.matrix = {}, None  # the first file is kept for its ids only
        blocks.append(knn.l2_normalise(block))
        clock.lap("normalise")
        if len(args.files) > 1:
            scores, _ = setup.scores(block, board.scored)
            board.add(f"file {i + 1}: {Path(path).name}",
                      argmax_over(scores, np.arange(len(scores)), treatment))
            del scores
            clock.lap("knn")
    features = blocks[0] if len(blocks) == 1 else knn.concatenate(blocks, weights)
    del blocks
    scores, used = setup.scores(features, np.arange(setup.wells.n))
    del features
    name = "knn" + (" concat (w=" + ",".join(f"{w:g}" for w in weights) + ")" if len(args.files) > 1 else "")
    board.add(name + (", test refs +val" if args.use_valid else ""), argmax_over(scores, board.scored, treatment))
    clock.lap("knn")
    extra = {"knn": {
        "k": k, "k_used": used, "use_valid": args.use_valid,
        "reference_wells": {"val": setup.n_ref, "test": setup.n_ref + setup.wells.n_val * args.use_valid},
        "ignored_train_controls": ref.ignored_controls,
        "features": "per file: sites summed, L2-normalised; files concatenated, scaled by sqrt(w/sum w)",
        "votes": "K nearest of the same cell type by cosine, each voting max(cos, 0); score = summed votes",
    }}
    return Ensemble(setup.wells, board, scores, masks, treatment, extra)


def plate_stages(ens: Ensemble, group_method: str, assign_scores: str, clock: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
    """Group inference, group restriction and per-plate assignment; returns (groups, labels).

    After the group inference every well competes only for its group's classes, so the later
    stages run on compact [wells, group size] blocks (plates.split_by_group), not on full-width
    rows that would be three quarters -inf.
    """
    import numpy as np

    import plates

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

    import metadata
    import plates

    weights = parse_weights(args.weights, len(args.files))
    for path in args.files:  # fail before the slow part when a file is simply not there
        if not Path(path).is_file():
            raise SubmissionError(f"prediction file {path} does not exist")
    if Path(args.output).is_dir():
        raise SubmissionError(f"-o/--output {args.output} is a directory")
    table = metadata.load_wells(Path(args.data))
    structure = metadata.derive_structure(table)
    if structure.n_groups == 0:
        raise SubmissionError(f"{args.data}: the metadata defines no plate groups (no labelled treatment wells)")
    clock.lap("metadata")

    if args.knn is not None:
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
    args = parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: -t/--threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        for variable in _THREAD_VARIABLES:  # read by the BLAS/OpenMP runtimes when numpy loads
            os.environ[variable] = str(args.threads)
    started = time.perf_counter()
    from knn import KnnError
    from metadata import DataError
    from predfile import PredictionFileError

    try:
        csv, report = build(args)
    except (SubmissionError, DataError, PredictionFileError, KnnError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    val, test = report["wells"]["val"], report["wells"]["test_labelled"]
    print(f"candidates for treatment wells: treatment classes only; {report['wells']['test']} test wells")
    if "knn" in report:
        info = report["knn"]
        print("kNN: K " + ", ".join(f"{c}={k}" for c, k in info["k"].items())
              + f"; neighbours of val wells: {info['reference_wells']['val']} training wells, of test wells: "
              + (f"those + {info['reference_wells']['test'] - info['reference_wells']['val']} val wells "
                 "(--use-valid: the val rows below do not include them)" if info["use_valid"]
                 else "the same"))
    print(Scoreboard.table_of(report["stages"], "val", f"validation accuracy ({val} wells)"))
    if test:
        print(Scoreboard.table_of(report["stages"], "test", f"test accuracy ({test} labelled wells)"))
    for split, counts in report["plate_groups_correct"].items():
        if counts["total"]:
            print(f"plate groups inferred correctly ({split}): {counts['correct']}/{counts['total']} plates")
    report["seconds"] = round(time.perf_counter() - started, 3)
    json_path = f"{args.output}.json"
    from atomic import write_with_companion
    try:  # never new scores beside an old CSV, even when killed between the two renames
        write_with_companion(args.output, csv, json_path, json.dumps(report, indent=1) + "\n")
    except OSError as e:
        print(f"error: cannot write {e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} and {json_path} in {report['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
