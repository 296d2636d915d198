#!/usr/bin/env python3
"""Beyond the 1st place, measured side by side: each option of the other top teams on and off, on
synthetic sets of different batch-effect strength, over several training seeds.

    python benchmarks/ablation.py [--out runs/ablation] [--jobs 2] [--seeds 0,1,2] [--batch-effects 1,3]

For every set (synthetic.py --layout release --batch-effect B: test labels known) and seed, the
demo-scale pipeline (demo.py's small CPU settings, smaller: see the flags) runs once per training
option: train with pseudo-labels, predict with TTA, make_submission. The submission-only options
(balancing, plate-centred kNN) run on the baseline's prediction (and embeddings) file. Printed:
validation and test accuracy after the per-plate assignment, mean +- sd over the seeds, and the
wall and CPU seconds of a run (train + predict + submission; wall depends on the machine's load,
CPU time much less). Everything else stays in OUT: each run's checkpoints and logs,
results.json (every run) and table.md (the table).

Every training option runs without the cell-type one-hot (--concat-cell-type false), baseline
included: same-plate batches cannot have it (a batch of one cell type gives its BatchNorm no
variance), and each row must differ from the baseline by its option alone.

Synthetic figures are not RxRx1 figures: the synthetic batch effect is a per-experiment gain and
offset per channel (and a cell-type look), which per-image normalisation largely removes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def training_options(image_size: int, epochs: int) -> dict[str, list[str]]:
    """Option name -> main.py flags (training and prediction), the baseline's first."""
    third = max(1, epochs // 3)
    schedule = f"{image_size // 2}:0,{3 * image_size // 4}:{third},{image_size}:{2 * third}"
    return {
        "baseline": [],
        "--model-ema 0.99": ["--model-ema", "0.99"],
        "--adabn plate": ["--adabn", "plate"],
        "--batch-sampling plate": ["--batch-sampling", "plate"],
        "--batch-sampling plate --adabn plate": ["--batch-sampling", "plate", "--adabn", "plate"],
        f"--image-size-schedule {schedule}": ["--image-size-schedule", schedule],
    }


def submission_options(k: int) -> dict[str, list[str]]:
    """Option name -> make_submission.py flags on the baseline's files ("knn": on its embeddings)."""
    return {
        "--balance sinkhorn": ["--balance", "sinkhorn"],
        "--balance columns": ["--balance", "columns"],
        "--assign-scores prob": ["--assign-scores", "prob"],
        "--assign-scores prob --balance sinkhorn": ["--assign-scores", "prob", "--balance", "sinkhorn"],
        "--assign-scores prob --balance columns": ["--assign-scores", "prob", "--balance", "columns"],
        f"--knn {k}": ["--knn", str(k)],
        f"--knn {k} --knn-center plate": ["--knn", str(k), "--knn-center", "plate"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (--seed)")
    p.add_argument("--batch-effects", default="1,3", help="synthetic.py --batch-effect of each set")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--image-size", type=int, default=24)
    p.add_argument("--signal", type=float, default=1.5, help="synthetic.py --signal")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--pl-epoch", type=int, default=5)
    p.add_argument("--lr", default="cosine,3e-3,5,1e-3")
    p.add_argument("--tta", type=int, default=4)
    p.add_argument("--knn", type=int, default=3, help="K of the kNN rows")
    p.add_argument("--only", default=None, help="run only the training options whose names contain this")
    args = p.parse_args(argv)
    args.seeds = [int(v) for v in args.seeds.split(",")]
    args.batch_effects = [float(v) for v in args.batch_effects.split(",")]
    if args.jobs < 1 or not 0 <= args.pl_epoch < args.epochs:
        p.error("need --jobs >= 1 and 0 <= --pl-epoch < --epochs")
    return args


def small_flags(args: argparse.Namespace, seed: int) -> list[str]:
    """demo.py's SMALL_CPU, smaller (embedding 64, -b 32), one thread, this seed, no cell-type one-hot."""
    import demo

    flags = list(demo.SMALL_CPU)
    flags[flags.index("--embedding-size") + 1] = "64"
    flags[flags.index("-b") + 1] = "32"
    flags[flags.index("--seed") + 1] = str(seed)
    return [*flags, "--threads", "1", "--device", "cpu", "--concat-cell-type", "false"]


def make_set(args: argparse.Namespace, batch_effect: float) -> Path:
    import synthetic
    from cellpaint.data.synthetic import INFO_FILE

    data = args.out / f"data_be{batch_effect:g}"
    info = data / INFO_FILE
    if not (info.exists() and json.loads(info.read_text()).get("complete")):
        argv = [str(data), "--layout", "release", "--classes", str(args.classes), "--image-size",
                str(args.image_size), "--signal", str(args.signal), "--batch-effect", str(batch_effect), "-q"]
        if synthetic.main(argv) != 0:
            raise SystemExit(f"synthetic.py {' '.join(argv)} failed")
    return data


def assigned(report_path: Path) -> tuple[float, float]:
    """Validation and test accuracy (all cell types) after the per-plate assignment."""
    last = json.loads(report_path.read_text())["stages"][-1]
    assert last["stage"].startswith("assignment"), last["stage"]
    return last["val"]["all"], last["test"]["all"]


def one_run(task: tuple) -> list[dict]:
    """Train + predict + submission for one (set, seed, option); the baseline also runs every
    submission option on its files. Output of the commands goes to the run's folder."""
    args, data, batch_effect, seed, name, flags = task
    import main as trainer
    import make_submission

    folder = args.out / f"be{batch_effect:g}" / f"seed{seed}" / name.replace("--", "").replace(" ", "_").replace(
        ":", "-").replace(",", "_")
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(data), *small_flags(args, seed), *flags]
    baseline = name == "baseline"
    started, cpu = time.perf_counter(), time.process_time()
    rows = []
    with open(folder / "output.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        save = folder / "net"
        last = f"{save}.{args.epochs - 1}"
        if trainer.main([*common, "--save", str(save), "-e", str(args.epochs), "--pl-epoch", str(args.pl_epoch),
                         "--pl-size-func", "0.6*x+0.4", "--lr", args.lr]) != 0:
            raise RuntimeError(f"training failed: see {folder / 'output.txt'}")
        if trainer.main([*common, "--mode", "predict", "--load", last, "--tta", str(args.tta),
                         *(["--save-embeddings"] if baseline else [])]) != 0:
            raise RuntimeError(f"prediction failed: see {folder / 'output.txt'}")
        submission = folder / "submission.csv"
        if make_submission.main(["--data", str(data), "-o", str(submission), f"{last}.output"]) != 0:
            raise RuntimeError(f"make_submission failed: see {folder / 'output.txt'}")
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        rows.append(dict(set=batch_effect, seed=seed, option=name, kind="training",
                         val=assigned(Path(f"{submission}.json"))[0], test=assigned(Path(f"{submission}.json"))[1],
                         wall_s=wall, cpu_s=cpu))
        if baseline:
            for other, extra in submission_options(args.knn).items():
                out = folder / f"sub_{len(rows)}.csv"
                started, cpu = time.perf_counter(), time.process_time()
                file = f"{last}.embeddings" if "--knn" in extra else f"{last}.output"
                if make_submission.main(["--data", str(data), "-o", str(out), *extra, file]) != 0:
                    raise RuntimeError(f"make_submission {' '.join(extra)} failed: see {folder / 'output.txt'}")
                val, test = assigned(Path(f"{out}.json"))
                rows.append(dict(set=batch_effect, seed=seed, option=other, kind="submission", val=val, test=test,
                                 wall_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu))
    return rows


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def table(results: list[dict], args: argparse.Namespace) -> str:
    """One markdown row per (option, set): accuracies mean +- sd over the seeds, seconds per run."""
    lines = ["| option | batch effect | val acc (assigned) | test acc (assigned) | wall s | CPU s |",
             "|---|---|---|---|---|---|"]
    names = list(training_options(args.image_size, args.epochs)) + list(submission_options(args.knn))
    for name in names:
        for effect in args.batch_effects:
            rows = [r for r in results if r["option"] == name and r["set"] == effect]
            if not rows:
                continue
            lines.append(f"| {name} | {effect:g} | {mean_sd([r['val'] for r in rows])} | "
                         f"{mean_sd([r['test'] for r in rows])} | {statistics.mean(r['wall_s'] for r in rows):.0f} | "
                         f"{statistics.mean(r['cpu_s'] for r in rows):.1f} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    before = machine()
    sets = {effect: make_set(args, effect) for effect in args.batch_effects}
    options = {n: f for n, f in training_options(args.image_size, args.epochs).items()
               if args.only is None or n == "baseline" or args.only in n}
    tasks = [(args, sets[effect], effect, seed, name, flags)
             for seed in args.seeds for effect in args.batch_effects for name, flags in options.items()]
    results: list[dict] = []
    print(f"{len(tasks)} runs of train + predict + submission, {args.jobs} at a time "
          f"(load average {before['load_average'][0]:.1f} on {before['cpus']} CPUs); logs in {args.out}/", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for done, rows in enumerate(pool.imap_unordered(one_run, tasks), 1):
            results.extend(rows)
            first = rows[0]
            print(f"[{done}/{len(tasks)}] batch effect {first['set']:g}, seed {first['seed']}, {first['option']}: "
                  f"val {first['val']:.3f}, test {first['test']:.3f} ({first['wall_s']:.0f} s wall, "
                  f"{first['cpu_s']:.0f} s CPU; {time.perf_counter() - started:.0f} s so far)", flush=True)
    text = table(results, args)
    after = machine()
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine_before": before, "machine_after": after, "wall_s": time.perf_counter() - started,
               "results": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "table.md").write_text(text + "\n")
    print(f"\n{text}\n\n{len(tasks)} runs in {summary['wall_s']:.0f} s; load average {before['load_average'][0]:.1f} "
          f"before, {after['load_average'][0]:.1f} after; torch {after['torch']}; {args.out}/table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
