#!/usr/bin/env python3
"""Synthetic RxRx1-like data sets, so every part of cellpaint-rcic runs on a CPU without the 47 GB data
(cellpaint/data/synthetic.py designs and writes them; this file is the command line).

    python synthetic.py data/synth --layout release --classes 40 --plates 4
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from cellpaint.cli import entry
from cellpaint.data.synthetic import generate
from cellpaint.data.synthetic_config import SyntheticConfig


# ----------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    d = SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="output directory (new, empty, or a previous synthetic data set)")
    p.add_argument("--layout", choices=["competition", "release", "wilds"], default=d.layout,
                   help="wilds: RxRx1-WILDS (metadata.csv with dataset train/val/test, one RGB composite per site)")
    p.add_argument("--cell-types", type=_str_list, default=",".join(d.cell_types), help="comma-separated cell-type names")
    p.add_argument("--train-experiments", type=_int_list, default=",".join(map(str, d.train_experiments)),
                   help="train experiments per cell type (one number, or one per cell type)")
    p.add_argument("--test-experiments", type=_int_list, default=",".join(map(str, d.test_experiments)),
                   help="test experiments per cell type (one number, or one per cell type)")
    p.add_argument("--val-experiments", type=_int_list, default=None,
                   help="wilds layout: val experiments per cell type (one number, or one per cell type; default 1)")
    p.add_argument("--classes", type=int, default=d.classes, help="treatment classes, a multiple of --plates")
    p.add_argument("--plates", type=int, default=d.plates, help="plates per experiment = plate groups")
    p.add_argument("--positive-controls", type=int, default=d.positive_controls)
    p.add_argument("--negative-wells", type=int, default=d.negative_wells, help="negative-control wells per plate")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--sites", type=int, default=d.sites)
    p.add_argument("--drop-wells", type=float, default=d.drop_wells, help="fraction of treatment wells dropped (QC)")
    p.add_argument("--signal", type=float, default=d.signal, help="class-effect strength multiplier")
    p.add_argument("--batch-effect", type=float, default=d.batch_effect, help="experiment/cell-type effect multiplier")
    p.add_argument("--noise", type=float, default=d.noise, help="well/cell/pixel noise multiplier")
    p.add_argument("--leak", action=argparse.BooleanOptionalAction, default=d.leak,
                   help="plant one test/train layout coincidence (plates shifted by one)")
    p.add_argument("--pixel-stats", action=argparse.BooleanOptionalAction, default=d.pixel_stats,
                   help="also write pixel_stats.csv")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def write(args: argparse.Namespace, config: SyntheticConfig) -> None:
    start = time.perf_counter()
    info = generate(args.out, config, progress=not args.quiet)
    leak = info["leak"]
    print(f"wrote {info['n_wells']} wells, {info['n_images']} images "
          f"({len(info['experiments']['train'])} train / "
          + (f"{len(info['experiments']['val'])} val / " if "val" in info["experiments"] else "")
          + f"{len(info['experiments']['test'])} test experiments, "
          f"{info['class_counts']['total']} classes, layout {config.layout}) to {args.out} "
          f"in {time.perf_counter() - start:.1f}s"
          + (f"; leak: {leak['test_experiment']} reuses {leak['train_experiment']} shifted by {leak['shift']}" if leak else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 written; 2 the flags cannot describe a data set, or the output directory is
    not ours to write (cellpaint/core/errors.py); 1 it could not be written; 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    n_ct = len(args.cell_types)
    if args.val_experiments is None:
        args.val_experiments = (1,) if args.layout == "wilds" else ()
    for name in ("train_experiments", "test_experiments", "val_experiments"):  # one number: the same for every cell type
        if len(getattr(args, name)) == 1:
            setattr(args, name, getattr(args, name) * n_ct)
    config = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    return entry.run(lambda: write(args, config), report=lambda line: print(f"{parser.prog}: error: {line}",
                                                                            file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
