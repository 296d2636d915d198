#!/usr/bin/env python3
"""The whole pipeline in one command, on a CPU in minutes (what `make demo` runs).

    python demo.py [--data DIR] [--out DIR]

1. data: a synthetic set in the release layout (so test labels are known), unless --data is given
2. train a small network with pseudo-labelling (main.py)
3. predict validation and test wells with 8 TTA views (main.py --mode predict)
4. ensemble, plate-group restriction and per-plate assignment (make_submission.py)
and print validation and test accuracy after each stage. The stages' scores stay in
OUT/submission.csv.json; the checkpoints, logs and curves in OUT/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from cellpaint.cli import entry  # noqa: E402
from cellpaint.core import errors  # noqa: E402

# The small CPU configuration: a plain 3-stage CNN from scratch at the data's own image size,
# without cutmix (it slows learning a lot on a data set this small), with label smoothing instead.
SMALL_CPU = ["--backbone", "smallcnn", "--pretrained", "none", "--embedding-size", "128", "-b", "64",
             "--gradient-accumulation", "1", "--num-data-workers", "0", "--cv-number", "0", "--seed", "0",
             "--cutmix", "0", "--label-smoothing", "0.1", "--disp-batches", "1000"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="an existing data set (either layout)")
    p.add_argument("--out", type=Path, default=Path("demo"), help="where everything is written")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--pl-epoch", type=int, default=12)
    p.add_argument("--lr", default="cosine,3e-3,12,1e-3")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tta", type=int, default=8)
    p.add_argument("--synthetic", default="", help="extra synthetic.py flags, e.g. '--classes 20'")
    args = p.parse_args(argv)
    if not 0 <= args.pl_epoch < args.epochs:
        p.error(f"--pl-epoch must be in [0, --epochs), got {args.pl_epoch}")
    return args


def synthetic_data(out: Path, extra: str) -> Path | None:
    """A release-layout synthetic set in OUT/data, generated once and reused (None: generation
    failed, and said why)."""
    import synthetic
    from cellpaint.data import synthetic as synthetic_data

    data = out / "data"
    info = data / synthetic_data.INFO_FILE
    if info.exists() and json.loads(info.read_text()).get("complete"):
        print(f"using the synthetic data already in {data}")
        return data
    argv = [str(data), "--layout", "release", *extra.split()]
    return data if synthetic.main(argv) == 0 else None


def stage_table(report: dict) -> str:
    """Stage | validation | test accuracy, from make_submission's JSON."""
    lines = [f"{'stage':<34}{'validation':>12}{'test':>10}"]
    for stage in report["stages"]:
        cells = []
        for split in ("val", "test"):
            acc = stage.get(split, {}).get("all") if isinstance(stage.get(split), dict) else None
            cells.append(f"{acc:.4f}" if isinstance(acc, (int, float)) else "-")
        lines.append(f"{stage['stage']:<34}{cells[0]:>12}{cells[1]:>10}")
    return "\n".join(lines)


def earlier_demo_run(save: Path, data: Path) -> bool:
    """Whether the run at `save` is an earlier demo's (its settings: this data, the demo's network):
    running the demo again replaces it (--overwrite); any other run there is refused by main.py."""
    try:
        recorded = json.loads(Path(f"{save}.args.json").read_text())
        return recorded["data"]["root"] == str(data) and recorded["model"]["backbone"] == SMALL_CPU[1]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def demo(args: argparse.Namespace) -> int:
    """The pipeline, command by command: each reports its own failure; the first non-zero status ends it."""
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or synthetic_data(args.out, args.synthetic)
    if data is None:
        return errors.FAILED

    import main as trainer
    import make_submission

    save = args.out / "net"
    common = ["--data", str(data), *SMALL_CPU, *(["--threads", str(args.threads)] if args.threads else [])]
    again = ["--overwrite"] if earlier_demo_run(save, data) else []
    rc = trainer.main([*common, "--save", str(save), "-e", str(args.epochs), "--pl-epoch", str(args.pl_epoch),
                       "--pl-size-func", "0.6*x+0.4", "--lr", args.lr, *again])
    if rc:
        return rc
    checkpoint = f"{save}.{args.epochs - 1}"
    rc = trainer.main([*common, "--mode", "predict", "--load", checkpoint, "--tta", str(args.tta)])
    if rc:
        return rc
    submission = args.out / "submission.csv"
    rc = make_submission.main(["--data", str(data), "-o", str(submission), f"{checkpoint}.output"])
    if rc:
        return rc
    report = json.loads(Path(f"{submission}.json").read_text())
    print(f"\ndemo finished in {time.time() - started:.0f} s; outputs in {args.out}/\n")
    print(stage_table(report))
    return errors.OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return entry.run(lambda: demo(args))


if __name__ == "__main__":
    sys.exit(main())
