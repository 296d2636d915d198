#!/usr/bin/env python3
"""Benchmark make_submission.py on full-size fake predictions: time, peak memory, accuracy.

    python benchmarks/submission.py [--workdir DIR] [--repeats 3] [--signals 1.0,2.0,3.0]

1. Writes a full-size fake data set (competition layout, 1,139 classes, 4 plate groups of 277;
   fake_predictions.py) and two prediction files (~4,400 val + ~19,900 test wells, 2 sites).
2. Runs `make_submission.py` on them `--repeats` times, each in a fresh process started by a
   small wrapper process, so RUSAGE_CHILDREN.ru_maxrss is the peak RSS of make_submission alone
   (not of this process, which holds the generated data, nor of the generator).
3. Compares the group methods (prob: summed probabilities, argmax: arg-max counts) on many
   plates in-process (plates.infer_plate_groups on the test experiments of fresh fake data,
   where the truth is known), over weak signals where they differ.
4. Compares --group-method prob/argmax and --assign-scores logsoftmax/logits/prob through the
   whole program (validation accuracy), at several signal strengths of the fake logits.
Prints markdown tables (the machine, its load and the date included) for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fake_predictions  # noqa: E402

sys.path.insert(0, str(ROOT))
from cellpaint.data.structure import derive_structure  # noqa: E402
from cellpaint.data import plates  # noqa: E402

# run one command, report its wall time and the peak RSS of that child only
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024,
                  "cpu_s": usage.ru_utime + usage.ru_stime}))
"""
# 9 folds: fold 0 then holds 4 of the 33 train experiments, ~4,400 val wells (the size of the task)
FOLDS = 9


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import numpy
    import scipy
    return (f"{cores} cores ({model}), Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"scipy {scipy.__version__}")


def load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def submission_command(info: dict, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "make_submission.py"), "--data", str(info["data"]), "-o", str(out),
            *extra, *map(str, info["files"])]


def measure(command: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(command)], capture_output=True, text=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"make_submission failed: {done.stderr}")
    return result


def accuracy(out: Path, split: str = "val") -> list[tuple[str, float]]:
    report = json.loads(Path(f"{out}.json").read_text())
    return [(s["stage"], s[split]["all"]) for s in report["stages"] if s[split]]


def group_sweep(signals: list[float], seeds: int, small: bool) -> list[tuple[float, int, dict]]:
    """Plates whose group each method gets right, on the test experiments of fresh fake data."""
    import numpy as np

    sizes = ((4, 8, 4, 2), 277, 30, 308) if not small else ((1, 2, 1, 1), 20, 3, 24)
    rows = []
    for signal in signals:
        right, total = {m: 0 for m in plates.GROUP_METHODS}, 0
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            wells = fake_predictions.make_wells(rng, ["HEPG2", "HUVEC", "RPE", "U2OS"], [1, 1, 1, 1], list(sizes[0]),
                                                4, sizes[1], sizes[2], sizes[3], dropped_wells=12, dropped_plates=0)
            wells["sirna_true"] = wells["sirna"]
            structure = derive_structure(wells)
            test = wells[(wells["split"] == "test") & (wells["well_type"] == "treatment")]
            labels = test["sirna"].to_numpy()
            scores = fake_predictions.fake_logits(labels, structure.n_classes, 2, signal, 0.5, seed, 0).sum(axis=1)
            experiment, plate = test["experiment"].to_numpy(), test["plate"].to_numpy()
            plate_index = plates.plate_ids(experiment, plate)
            truth = plates.class_groups(structure.group_masks())[labels]
            for method in plates.GROUP_METHODS:
                found = plates.infer_plate_groups(scores, experiment, plate, structure.group_masks(), method)
                wrong = np.bincount(plate_index, weights=found != truth)
                right[method] += int((wrong == 0).sum())
            total += int(plate_index.max()) + 1
        rows.append((signal, total, right))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="where to write the fake data (default: a temporary directory, removed)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the table shows the best and the median)")
    p.add_argument("--signal", type=float, default=2.0, help="signal of the timed data set")
    p.add_argument("--signals", default="1,2,3", help="signal strengths for the whole-program comparison")
    p.add_argument("--group-signals", default="0.3,0.4,0.5,0.6,0.8,1",
                   help="signal strengths for the group-method sweep")
    p.add_argument("--group-seeds", type=int, default=3, help="data sets per signal in the group-method sweep")
    p.add_argument("--small", action="store_true", help="a tiny data set (a smoke test of this script)")
    a = p.parse_args(argv)
    sizes = dict(folds=FOLDS)
    if a.small:
        sizes = dict(train_experiments=(2, 3, 2, 1), test_experiments=(1, 2, 1, 1), group_size=20,
                     positive_controls=3, wells_per_plate=24, dropped_wells=3, folds=3)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_submission_"))
    try:
        print(f"# make_submission.py benchmark, {datetime.date.today().isoformat()}")
        print(f"machine: {machine()}; load average at start: {load()}\n")

        info = fake_predictions.generate(work / f"signal_{a.signal:g}", signal=a.signal, **sizes)
        runs = [measure(submission_command(info, work / "timed.csv")) for _ in range(a.repeats)]
        walls = sorted(r["wall_s"] for r in runs)
        report = json.loads(Path(f"{work / 'timed.csv'}.json").read_text())
        print(f"data: {info['n_classes']} classes, {info['val_wells']} val + {info['test_wells']} test wells, "
              f"2 files x 2 sites, {sum(f.stat().st_size for f in info['files']) / 1e6:.0f} MB of pickles; "
              f"signal {a.signal:g}\n")
        print("| runs | wall best (s) | wall median (s) | CPU best (s) | peak RSS max (MB) |")
        print("|---|---|---|---|---|")
        print(f"| {len(runs)} | {walls[0]:.2f} | {walls[len(walls) // 2]:.2f} | "
              f"{min(r['cpu_s'] for r in runs):.2f} | {max(r['peak_mb'] for r in runs):.0f} |\n")
        print("phases of the last run (wall / CPU s): " + ", ".join(
            f"{k} {v['wall_s']:.2f}/{v['cpu_s']:.2f}" for k, v in report["timings"].items()) + "\n")
        print("| stage | val accuracy |")
        print("|---|---|")
        for stage, acc in accuracy(work / "timed.csv"):
            print(f"| {stage} | {acc:.4f} |")
        print()

        print("group inference alone: plates given the right group, test experiments of fresh data sets\n")
        print("| signal | plates | " + " | ".join(plates.GROUP_METHODS) + " |")
        print("|---|---|" + "---|" * len(plates.GROUP_METHODS))
        for signal, total, right in group_sweep([float(v) for v in a.group_signals.split(",")],
                                                a.group_seeds, a.small):
            print(f"| {signal:g} | {total} | " + " | ".join(f"{right[m]} ({right[m] / total:.0%})"
                                                         for m in plates.GROUP_METHODS) + " |")
        print()

        print("whole program: val accuracy after groups / after assignment; val plates with the right group\n")
        print("| signal | single file | group method | plates right | groups | "
              "assign logsoftmax | assign logits | assign prob |")
        print("|---|---|---|---|---|---|---|---|")
        for signal in (float(s) for s in a.signals.split(",")):
            data = info if signal == a.signal else fake_predictions.generate(
                work / f"signal_{signal:g}", signal=signal, **sizes)
            for method in ("prob", "argmax"):
                row, single, groups, plates_right = [], "", "", ""
                for scores in ("logsoftmax", "logits", "prob"):
                    out = work / f"cmp_{signal:g}_{method}_{scores}.csv"
                    measure(submission_command(data, out, "--group-method", method, "--assign-scores", scores))
                    acc = dict(accuracy(out))
                    single = f"{next(v for k, v in acc.items() if k.startswith('file 1')):.4f}"
                    groups = f"{next(v for k, v in acc.items() if k.startswith('groups')):.4f}"
                    row.append(f"{next(v for k, v in acc.items() if k.startswith('assignment')):.4f}")
                    check = json.loads(Path(f"{out}.json").read_text())["plate_groups_correct"]["val"]
                    plates_right = f"{check['correct']}/{check['total']}"
                print(f"| {signal:g} | {single} | {method} | {plates_right} | {groups} | " + " | ".join(row) + " |")
            if data is not info:
                shutil.rmtree(work / f"signal_{signal:g}", ignore_errors=True)
        print(f"\nload average at end: {load()}")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
