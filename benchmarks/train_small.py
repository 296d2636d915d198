#!/usr/bin/env python3
"""Does the trainer learn? The small CPU configuration on synthetic.py's default data, validation
accuracy per epoch (chance = 1 / treatment classes).

    python benchmarks/train_small.py [--out runs/train_small] [--epochs 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/train_small"))
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or demo.synthetic_data(args.out, "")

    import main as trainer
    from cellpaint.data import metadata
    from cellpaint.data.structure import derive_structure

    n_treatment = len(derive_structure(metadata.load_wells(data)).treatment_classes)
    started = time.time()
    save = args.out / "net"
    rc = trainer.main(["--data", str(data), *demo.SMALL_CPU, "--save", str(save), "-e", str(args.epochs),
                       "--lr", "cosine,3e-3", "--overwrite",  # --out: this benchmark's own folder, run again
                       *(["--threads", str(args.threads)] if args.threads else [])])
    if rc:
        return rc
    metrics = pd.read_csv(f"{save}.metrics.csv")
    columns = ["epoch", "train_loss", "acc"] + [c for c in metrics.columns if c.startswith("acc_")] + ["seconds"]
    print(f"\nsmall CPU configuration on {data}: {args.epochs} epochs in {time.time() - started:.0f} s; "
          f"validation = fold 0, chance {1 / n_treatment:.3f}")
    print(metrics[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
