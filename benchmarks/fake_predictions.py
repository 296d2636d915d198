#!/usr/bin/env python3
"""Fake metadata and prediction files with the structure of the real data, for make_submission.

    python benchmarks/fake_predictions.py OUT [--signal 2.0] [--files 2] [...]

writes OUT/data/ (competition layout: train.csv, test.csv, train_controls.csv,
test_controls.csv; or with --layout release: metadata.csv, test labels included) and
OUT/pred_<k>.output, prediction files in the format of cellpaint/data/prediction_file.py. No images.

Design (defaults = the competition's sizes; every one is a flag, so tests run tiny versions):
treatment classes are split at random into as many plate groups as an experiment has plates;
every plate holds one group (a random order per experiment), each class in one random well,
plus the positive controls and negative-control wells that fill the plate. A few treatment
wells are dropped, and optionally whole test plates.

Logits per site: signal * difficulty(well) on the true class + unit Gaussian noise, part of it
shared by all files (a property of the well, so ensembling helps but not without limit) and
the rest each file's own. The 'val' part holds the treatment wells of one fold's experiments
(assign_folds), the 'test' part every test treatment well.
"""
from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellpaint.data.folds import assign_folds  # noqa: E402
from cellpaint.core.atomic import write_text  # noqa: E402
from cellpaint.data.prediction_file import save_predictions  # noqa: E402

_BLOCK = 2048  # wells per block of generated logits


def well_names(n: int) -> list[str]:
    """Plate well names on a grid of at most 22 columns (B02..O23 for 308), row letters from B."""
    columns = min(n, 22)
    rows = -(-n // columns)
    if rows > len(string.ascii_uppercase) - 1:
        raise ValueError(f"{n} wells do not fit a plate grid of 22 columns and rows B..Z")
    return [f"{string.ascii_uppercase[1 + i // columns]}{2 + i % columns:02d}" for i in range(n)]


def make_wells(rng: np.random.Generator, cell_types: list[str], train_counts: list[int],
               test_counts: list[int], plates: int, group_size: int, positive_controls: int,
               wells_per_plate: int, dropped_wells: int, dropped_plates: int) -> pd.DataFrame:
    """One row per well: id_code, experiment, plate, well, sirna, well_type, split, cell_type."""
    n_treatment = plates * group_size
    negatives = wells_per_plate - group_size - positive_controls
    if negatives < 1:
        raise ValueError(f"{wells_per_plate} wells a plate cannot hold {group_size} treatments, "
                         f"{positive_controls} positive controls and a negative control")
    groups = rng.permutation(n_treatment).reshape(plates, group_size)
    names = np.array(well_names(wells_per_plate))
    plate_classes = np.concatenate([np.zeros(group_size, dtype=np.int64),
                                    n_treatment + np.arange(positive_controls),
                                    np.full(negatives, n_treatment + positive_controls)])
    types = np.array(["treatment"] * group_size + ["positive_control"] * positive_controls
                     + ["negative_control"] * negatives)
    frames = []
    for split, counts in (("train", train_counts), ("test", test_counts)):
        for cell, count in zip(cell_types, counts):
            for e in range(count):
                # test experiments number on after the train ones of the cell type, as in RxRx1
                number = e + 1 + (train_counts[cell_types.index(cell)] if split == "test" else 0)
                experiment = f"{cell}-{number:02d}"
                order = rng.permutation(plates)
                for p in range(plates):
                    classes = plate_classes.copy()
                    classes[:group_size] = rng.permutation(groups[order[p]])
                    position = rng.permutation(wells_per_plate)
                    frames.append(pd.DataFrame({
                        "experiment": experiment, "plate": p + 1, "well": names[position],
                        "sirna": classes, "well_type": types, "split": split, "cell_type": cell}))
    wells = pd.concat(frames, ignore_index=True)
    wells["id_code"] = wells["experiment"] + "_" + wells["plate"].astype(str) + "_" + wells["well"]
    treatment = np.flatnonzero(wells["well_type"].to_numpy() == "treatment")
    drop = rng.choice(treatment, size=min(dropped_wells, len(treatment)), replace=False)
    keep = np.ones(len(wells), dtype=bool)
    keep[drop] = False
    test_plates = wells.loc[wells["split"] == "test", ["experiment", "plate"]].drop_duplicates()
    if dropped_plates:
        gone = test_plates.sample(n=min(dropped_plates, len(test_plates)), random_state=rng.integers(2**31))
        keep &= ~wells.set_index(["experiment", "plate"]).index.isin(list(gone.itertuples(index=False)))
    return wells[keep].sort_values(["split", "experiment", "plate", "well"]).reset_index(drop=True)


def write_metadata(wells: pd.DataFrame, data_dir: Path, layout: str, sites: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    if layout == "release":
        rows = wells.loc[wells.index.repeat(sites)].reset_index(drop=True)
        rows["site"] = np.tile(np.arange(1, sites + 1), len(wells))
        release = pd.DataFrame({
            "site_id": rows["id_code"] + "_" + rows["site"].astype(str), "well_id": rows["id_code"],
            "cell_type": rows["cell_type"], "dataset": rows["split"], "experiment": rows["experiment"],
            "plate": rows["plate"], "well": rows["well"], "site": rows["site"],
            "well_type": rows["well_type"], "sirna": "s" + rows["sirna"].astype(str),
            "sirna_id": rows["sirna"]})
        write_text(data_dir / "metadata.csv", release.to_csv(index=False))
        return
    for split in ("train", "test"):
        part = wells[wells["split"] == split]
        treatment = part[part["well_type"] == "treatment"]
        columns = ["id_code", "experiment", "plate", "well"] + (["sirna"] if split == "train" else [])
        write_text(data_dir / f"{split}.csv", treatment[columns].to_csv(index=False))
        controls = part[part["well_type"] != "treatment"]
        write_text(data_dir / f"{split}_controls.csv",
                   controls[["id_code", "experiment", "plate", "well", "sirna", "well_type"]].to_csv(index=False))


def fake_logits(labels: np.ndarray, n_classes: int, sites: int, signal: float, shared: float,
                seed: int, file_index: int) -> np.ndarray:
    """float32 [wells, sites, classes]; the shared part depends on `seed` only, the rest on the file."""
    out = np.empty((len(labels), sites, n_classes), dtype=np.float32)
    own_scale, shared_scale = np.float32(np.sqrt(1 - shared)), np.float32(np.sqrt(shared))
    for start in range(0, len(labels), _BLOCK):
        block = slice(start, start + _BLOCK)
        n = len(labels[block])
        common = np.random.default_rng([seed, start, 1 << 20])  # the same for every file
        difficulty = common.lognormal(0.0, 0.4, size=n).astype(np.float32)
        noise = common.standard_normal((n, sites, n_classes), dtype=np.float32) * shared_scale
        own = np.random.default_rng([seed, start, file_index])
        noise += own.standard_normal((n, sites, n_classes), dtype=np.float32) * own_scale
        noise[np.arange(n), :, labels[block]] += (signal * difficulty)[:, None]
        out[block] = noise
    return out


def generate(out_dir: str | Path, *, layout: str = "competition",
             cell_types: tuple = ("HEPG2", "HUVEC", "RPE", "U2OS"), train_experiments: tuple = (7, 16, 7, 3),
             test_experiments: tuple = (4, 8, 4, 2), plates: int = 4, group_size: int = 277,
             positive_controls: int = 30, wells_per_plate: int = 308, dropped_wells: int = 12,
             dropped_plates: int = 0, sites: int = 2, files: int = 2, signal: float = 2.0,
             shared_noise: float = 0.5, folds: int = 6, fold: int = 0, val: bool = True,
             seed: int = 0) -> dict:
    """Write the fake data set and prediction files; return their paths and sizes."""
    if not (len(cell_types) == len(train_experiments) == len(test_experiments)):
        raise ValueError("--cell-types, --train-experiments and --test-experiments must have one entry each")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    wells = make_wells(rng, list(cell_types), list(train_experiments), list(test_experiments), plates,
                       group_size, positive_controls, wells_per_plate, dropped_wells, dropped_plates)
    data_dir = out_dir / "data"
    write_metadata(wells, data_dir, layout, sites)
    n_classes = int(wells["sirna"].max()) + 1

    treatment = wells[wells["well_type"] == "treatment"]
    test = treatment[treatment["split"] == "test"]
    val_experiments: list[str] = []
    if val:
        assigned = assign_folds(wells, folds, seed)
        val_experiments = sorted(e for e, f in assigned.items() if f == fold)
    val_rows = treatment[treatment["experiment"].isin(val_experiments)]
    paths = []
    for k in range(files):
        output = {}
        for part, rows in (("test", test), ("val", val_rows)):
            logits = fake_logits(rows["sirna"].to_numpy(), n_classes, sites, signal, shared_noise,
                                 seed + (0 if part == "test" else 7919), k)
            output[part] = {i: list(site_logits) for i, site_logits in zip(rows["id_code"], logits)}
        path = out_dir / f"pred_{k}.output"
        save_predictions(path, output)
        paths.append(path)
    return {"data": data_dir, "files": paths, "n_classes": n_classes, "val_wells": len(val_rows),
            "test_wells": len(test), "val_experiments": val_experiments}


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory (data/ and pred_<k>.output inside)")
    p.add_argument("--layout", choices=("competition", "release"), default="competition")
    p.add_argument("--cell-types", default="HEPG2,HUVEC,RPE,U2OS")
    p.add_argument("--train-experiments", type=_ints, default=(7, 16, 7, 3), help="per cell type")
    p.add_argument("--test-experiments", type=_ints, default=(4, 8, 4, 2), help="per cell type")
    p.add_argument("--plates", type=int, default=4, help="plates per experiment = plate groups")
    p.add_argument("--group-size", type=int, default=277, help="treatment classes per plate group")
    p.add_argument("--positive-controls", type=int, default=30)
    p.add_argument("--wells-per-plate", type=int, default=308)
    p.add_argument("--dropped-wells", type=int, default=12, help="treatment wells removed at random")
    p.add_argument("--dropped-plates", type=int, default=0, help="whole test plates removed")
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--files", type=int, default=2, help="prediction files (independent noise)")
    p.add_argument("--signal", type=float, default=2.0, help="true-class logit boost, in noise units")
    p.add_argument("--shared-noise", type=float, default=0.5, help="fraction of noise variance shared by files")
    p.add_argument("--folds", type=int, default=6)
    p.add_argument("--fold", type=int, default=0, help="the fold whose experiments form the val part")
    p.add_argument("--no-val", action="store_true", help="write no val part")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = generate(a.out, layout=a.layout, cell_types=tuple(a.cell_types.split(",")),
                    train_experiments=a.train_experiments, test_experiments=a.test_experiments,
                    plates=a.plates, group_size=a.group_size, positive_controls=a.positive_controls,
                    wells_per_plate=a.wells_per_plate, dropped_wells=a.dropped_wells,
                    dropped_plates=a.dropped_plates, sites=a.sites, files=a.files, signal=a.signal,
                    shared_noise=a.shared_noise, folds=a.folds, fold=a.fold, val=not a.no_val, seed=a.seed)
    print(f"wrote {info['data']} ({info['n_classes']} classes) and {len(info['files'])} prediction file(s): "
          f"{info['val_wells']} val wells ({', '.join(info['val_experiments']) or 'none'}), "
          f"{info['test_wells']} test wells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
