#!/usr/bin/env python3
"""Synthetic RxRx1-like data sets, so every part of cellpaint-rcic runs on a CPU without the 47 GB data.

The generator reproduces the *structure* of the real data at any scale (experiments, plates, plate groups,
controls, QC-dropped wells, two sites per well, six 8-bit channels, the HUVEC-18/RPE-03 style layout
coincidence) and draws images whose content depends on the class (channel profile + morphology), the
experiment (batch effect) and the well/site (jitter, cell positions, pixel noise), so a model has something
real to learn and must generalise across experiments.

Both output layouts of SPEC.md "The data" are supported; the same config and seed give the same labels and
byte-identical images in either (drawn by cellpaint/data/synthetic_images.py; this module writes the design,
the tables and the files). No torch import here on purpose: generating data should start instantly.

    python synthetic.py data/synth --layout release --classes 40 --plates 4
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from cellpaint.data.synthetic_images import (CHANNELS, cell_type_of, class_params, experiment_params, keyed_rng,
                                             render_site, well_phenotype)
from cellpaint.core.errors import UsageError

GENERATOR = "cellpaint-rcic synthetic"
INFO_FILE = "synthetic_info.json"
ROWS = "BCDEFGHIJKLMNO"            # rows B..O of a 384-well plate (A and P are unused in RxRx1)
COLUMNS = range(2, 24)             # columns 02..23
MAX_WELLS = len(ROWS) * len(COLUMNS)  # 308, exactly the used wells of a real plate
# Everything generate() may create; only these are removed when overwriting a previous synthetic data set.
OUTPUT_NAMES = ("train", "test", "images", "train.csv", "test.csv", "train_controls.csv",
                "test_controls.csv", "metadata.csv", "pixel_stats.csv", INFO_FILE)


@dataclass
class SyntheticConfig:
    """All knobs of a synthetic data set. `signal`, `batch_effect` and `noise` scale built-in strengths (1 = tuned default)."""
    layout: str = "competition"
    cell_types: tuple[str, ...] = ("HEPG2", "HUVEC", "RPE", "U2OS")
    train_experiments: tuple[int, ...] = (3, 3, 3, 3)  # per cell type
    test_experiments: tuple[int, ...] = (1, 1, 1, 1)   # per cell type, numbered after the train ones
    classes: int = 40                                  # treatment classes, a multiple of `plates`
    plates: int = 4
    positive_controls: int = 3
    negative_wells: int = 1
    image_size: int = 48
    sites: int = 2
    drop_wells: float = 0.03
    signal: float = 1.0
    batch_effect: float = 1.0
    noise: float = 1.0
    leak: bool = True
    pixel_stats: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept lists (e.g. from a JSON round trip) but store tuples: a config read back compares equal to the one written.
        self.cell_types = tuple(self.cell_types)
        self.train_experiments = tuple(int(n) for n in self.train_experiments)
        self.test_experiments = tuple(int(n) for n in self.test_experiments)

    @property
    def wells_per_plate(self) -> int:
        return self.classes // max(self.plates, 1) + self.positive_controls + self.negative_wells

    def validate(self) -> None:
        """Raise ValueError with a message naming the CLI flag when the config cannot describe a data set."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(self.layout in ("competition", "release"), f"--layout must be 'competition' or 'release', not {self.layout!r}")
        need(len(self.cell_types) > 0, "--cell-types must name at least one cell type")
        need(len(set(self.cell_types)) == len(self.cell_types), "--cell-types must not repeat a name")
        for ct in self.cell_types:
            need(bool(re.fullmatch(r"[A-Za-z0-9]+", ct)), f"--cell-types: {ct!r} must be letters/digits only (no '-' or '_')")
        for flag, counts in (("--train-experiments", self.train_experiments), ("--test-experiments", self.test_experiments)):
            need(len(counts) == len(self.cell_types),
                 f"{flag} needs one count per cell type ({len(self.cell_types)}), got {len(counts)}")
            need(all(0 <= n for n in counts), f"{flag} counts must be >= 0")
        need(sum(self.train_experiments) >= 1, "--train-experiments: at least one train experiment is needed")
        need(self.plates >= 1, "--plates must be >= 1")
        need(self.classes >= 1, "--classes must be >= 1")
        need(self.classes % self.plates == 0,
             f"--classes ({self.classes}) must be a multiple of --plates ({self.plates}): "
             f"each plate holds one plate group of classes/plates siRNAs")
        need(self.positive_controls >= 0, "--positive-controls must be >= 0")
        need(self.negative_wells >= 0, "--negative-wells must be >= 0")
        need(self.wells_per_plate <= MAX_WELLS,
             f"{self.wells_per_plate} wells per plate (classes/plates + positive controls + negative wells) "
             f"exceed the {MAX_WELLS} usable wells of a 384-well plate")
        need(8 <= self.image_size <= 2048, "--image-size must be in [8, 2048]")
        need(self.sites >= 1, "--sites must be >= 1")
        need(0.0 <= self.drop_wells < 1.0, "--drop-wells must be in [0, 1)")
        for flag, v in (("--signal", self.signal), ("--batch-effect", self.batch_effect), ("--noise", self.noise)):
            need(v >= 0.0 and np.isfinite(v), f"{flag} must be a finite number >= 0")
        need(self.seed >= 0, "--seed must be >= 0")
        if self.leak:
            need(bool(_leak_candidates(self)),
                 "--leak needs a test experiment and a train experiment of a different cell type; use --no-leak")


class OutputDirError(UsageError, FileExistsError):
    """The output directory holds something that is not a previous synthetic data set."""


def experiment_names(config: SyntheticConfig) -> dict[str, list[str]]:
    """{'train': [...], 'test': [...]}: per cell type, train experiments first, test ones continue the numbering."""
    out: dict[str, list[str]] = {"train": [], "test": []}
    for ct, n_train, n_test in zip(config.cell_types, config.train_experiments, config.test_experiments):
        out["train"] += [f"{ct}-{i:02d}" for i in range(1, n_train + 1)]
        out["test"] += [f"{ct}-{i:02d}" for i in range(n_train + 1, n_train + n_test + 1)]
    return out


def _leak_candidates(config: SyntheticConfig) -> list[tuple[str, str]]:
    names = experiment_names(config)
    return [(t, r) for t in names["test"] for r in names["train"] if cell_type_of(t) != cell_type_of(r)]


def well_names(n: int) -> list[str]:
    """The first n wells of a 384-well plate in row-major order: B02, B03, ..., B23, C02, ..."""
    return [f"{r}{c:02d}" for r in ROWS for c in COLUMNS][:n]


# ----------------------------------------------------------------------------------------------- design
def make_design(config: SyntheticConfig) -> tuple[pd.DataFrame, dict]:
    """Which class sits in which well of which plate, before any pixel is drawn.

    Returns the well table (experiment, plate, well, sirna, well_type, dataset, cell_type, dropped) and the
    structural part of the info dict (groups, plate_groups, leak, ...)."""
    config.validate()
    T, P, n_plates = config.classes, config.positive_controls, config.plates
    names = experiment_names(config)
    # Plate groups: a random partition (never contiguous ranges, so downstream code cannot rely on that).
    perm = keyed_rng(config.seed, "groups").permutation(T)
    groups = [sorted(int(c) for c in chunk) for chunk in np.split(perm, n_plates)]
    controls = list(range(T, T + P)) + [T + P] * config.negative_wells
    wells = well_names(config.wells_per_plate)

    layouts: dict[str, list[tuple[int, list[int]]]] = {}  # exp -> per plate (group index, class per well)
    for exp in names["train"] + names["test"]:
        rng = keyed_rng(config.seed, "layout", exp)
        order = rng.permutation(n_plates)
        plates = []
        for p in range(n_plates):
            content = np.array(groups[order[p]] + controls)
            plates.append((int(order[p]), [int(c) for c in content[rng.permutation(len(content))]]))
        layouts[exp] = plates

    leak = None
    if config.leak:
        cands = _leak_candidates(config)
        t_exp, r_exp = cands[int(keyed_rng(config.seed, "leak").integers(len(cands)))]
        # Shift 1: plate p of the test experiment holds plate p-1 of the train one; plate 1 takes the last.
        layouts[t_exp] = [layouts[r_exp][(p - 1) % n_plates] for p in range(n_plates)]
        leak = {"test_experiment": t_exp, "train_experiment": r_exp, "shift": 1}

    rows = []
    for dataset in ("train", "test"):
        for exp in names[dataset]:
            for p, (_, content) in enumerate(layouts[exp], start=1):
                for well, c in zip(wells, content):
                    wtype = "treatment" if c < T else ("positive_control" if c < T + P else "negative_control")
                    rows.append((f"{exp}_{p}_{well}", exp, p, well, c, wtype, dataset, cell_type_of(exp)))
    df = pd.DataFrame(rows, columns=["id_code", "experiment", "plate", "well", "sirna", "well_type", "dataset", "cell_type"])
    df = df.sort_values(["experiment", "plate", "well"], kind="stable").reset_index(drop=True)
    # QC drops: an exact fraction of all treatment wells, chosen at random.
    treat = np.flatnonzero(df["well_type"].to_numpy() == "treatment")
    n_drop = int(round(config.drop_wells * len(treat)))
    df["dropped"] = False
    df.loc[keyed_rng(config.seed, "drop").choice(treat, n_drop, replace=False), "dropped"] = True

    structure = {
        "experiments": names,
        "cell_types": list(config.cell_types),
        "class_counts": {"treatment": T, "positive_control": P, "negative_control": 1, "total": T + P + 1,
                         "per_group": T // n_plates},
        "wells_per_plate": config.wells_per_plate,
        "groups": groups,
        "plate_groups": {f"{exp}_{p}": g for exp, plates in sorted(layouts.items())
                         for p, (g, _) in enumerate(plates, start=1)},
        "leak": leak,
        "dropped_wells": sorted(df.loc[df["dropped"], "id_code"].tolist()),
    }
    return df, structure


# ----------------------------------------------------------------------------------------------- writing
def _prepare_out_dir(out_dir: Path) -> None:
    """Create out_dir, or clear a previous synthetic data set there; never touch anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        info = out_dir / INFO_FILE
        try:
            ours = json.loads(info.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputDirError(f"{out_dir} is not empty and is not a synthetic data set (no {INFO_FILE}); "
                                 f"refusing to write there. Choose an empty or new directory.")
        for name in OUTPUT_NAMES:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def generate(out_dir: Path, config: SyntheticConfig, progress: bool = True) -> dict:
    """Write a complete synthetic data set to out_dir in config.layout; return (and save) the info dict."""
    config.validate()
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    # Mark the directory as ours before writing, so an interrupted run can be overwritten by the next one.
    _write_json(out_dir / INFO_FILE, {"generator": GENERATOR, "complete": False})

    design, structure = make_design(config)
    kept = design[~design["dropped"]].reset_index(drop=True)
    cls = class_params(config)
    stats_rows: list[tuple] = []
    plates = kept.groupby(["experiment", "plate"], sort=True)
    for (exp_name, plate), wells in tqdm(plates, total=plates.ngroups, desc="synthetic plates",
                                         unit="plate", disable=not progress):
        exp = experiment_params(config, exp_name)
        split = wells["dataset"].iat[0]
        folder = out_dir / ("images" if config.layout == "release" else split) / exp_name / f"Plate{plate}"
        folder.mkdir(parents=True, exist_ok=True)
        for row in wells.itertuples(index=False):
            pheno = well_phenotype(cls, row.sirna, config.noise, keyed_rng(config.seed, "well", exp_name, plate, row.well))
            for site in range(1, config.sites + 1):
                img = render_site(config, pheno, exp, keyed_rng(config.seed, "site", exp_name, plate, row.well, site))
                for ch in range(CHANNELS):
                    Image.fromarray(img[ch]).save(folder / f"{row.well}_s{site}_w{ch + 1}.png")
                    if config.pixel_stats:
                        x = img[ch]
                        stats_rows.append((row.id_code, exp_name, plate, row.well, site, ch + 1, float(x.mean()),
                                           float(x.std()), float(np.median(x)), int(x.min()), int(x.max())))

    _write_tables(out_dir, config, kept)
    if config.pixel_stats:
        pd.DataFrame(stats_rows, columns=["id_code", "experiment", "plate", "well", "site", "channel", "mean", "std",
                                          "median", "min", "max"]).to_csv(out_dir / "pixel_stats.csv", index=False)
    test_treat = kept[(kept["dataset"] == "test") & (kept["well_type"] == "treatment")]
    info = {
        "generator": GENERATOR,
        "complete": True,
        "layout": config.layout,
        "config": asdict(config),
        **structure,
        "n_wells": int(len(kept)),
        "n_sites": int(len(kept) * config.sites),
        "n_images": int(len(kept) * config.sites * CHANNELS),
        "test_labels": {i: int(s) for i, s in zip(test_treat["id_code"], test_treat["sirna"])},
    }
    _write_json(out_dir / INFO_FILE, info)
    return info


def write_metadata(out_dir: Path, config: SyntheticConfig) -> tuple[pd.DataFrame, dict]:
    """A data set's tables without its images, for planting embeddings or predictions on the
    design (make_submission.py needs no pixels). Returns the kept wells (column `dataset` is the
    split, `sirna` the true class) and the design's structure (groups, plate_groups, ...)."""
    design, structure = make_design(config)
    kept = design[~design["dropped"]].reset_index(drop=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_tables(Path(out_dir), config, kept)
    return kept, structure


def sirna_name(k: int, config: SyntheticConfig) -> str:
    """Release-layout siRNA name: s##### for treatments, p##### for positive controls, EMPTY for the negative one."""
    if k < config.classes:
        return f"s{k:05d}"
    return f"p{k - config.classes:05d}" if k < config.classes + config.positive_controls else "EMPTY"


def _write_tables(out_dir: Path, config: SyntheticConfig, kept: pd.DataFrame) -> None:
    if config.layout == "competition":
        base = ["id_code", "experiment", "plate", "well"]
        for split in ("train", "test"):
            part = kept[kept["dataset"] == split]
            treat = part[part["well_type"] == "treatment"]
            (treat[base + ["sirna"]] if split == "train" else treat[base]).to_csv(out_dir / f"{split}.csv", index=False)
            part[part["well_type"] != "treatment"][base + ["sirna", "well_type"]].to_csv(
                out_dir / f"{split}_controls.csv", index=False)
        return
    sites = kept.loc[kept.index.repeat(config.sites)].copy()
    sites["site"] = np.tile(np.arange(1, config.sites + 1), len(kept))
    sites["site_id"] = sites["id_code"] + "_" + sites["site"].astype(str)
    sites["sirna_id"] = sites["sirna"]
    sites["sirna"] = [sirna_name(k, config) for k in sites["sirna_id"]]
    sites = sites.rename(columns={"id_code": "well_id"})
    cols = ["site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site", "well_type", "sirna", "sirna_id"]
    sites[cols].to_csv(out_dir / "metadata.csv", index=False)


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
    p.add_argument("--layout", choices=["competition", "release"], default=d.layout)
    p.add_argument("--cell-types", type=_str_list, default=",".join(d.cell_types), help="comma-separated cell-type names")
    p.add_argument("--train-experiments", type=_int_list, default=",".join(map(str, d.train_experiments)),
                   help="train experiments per cell type (one number, or one per cell type)")
    p.add_argument("--test-experiments", type=_int_list, default=",".join(map(str, d.test_experiments)),
                   help="test experiments per cell type (one number, or one per cell type)")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    n_ct = len(args.cell_types)
    for name in ("train_experiments", "test_experiments"):  # one number means the same for every cell type
        if len(getattr(args, name)) == 1:
            setattr(args, name, getattr(args, name) * n_ct)
    config = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    start = time.perf_counter()
    try:
        info = generate(args.out, config, progress=not args.quiet)
    except OutputDirError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    leak = info["leak"]
    print(f"wrote {info['n_wells']} wells, {info['n_images']} images "
          f"({len(info['experiments']['train'])} train / {len(info['experiments']['test'])} test experiments, "
          f"{info['class_counts']['total']} classes, layout {config.layout}) to {args.out} "
          f"in {time.perf_counter() - start:.1f}s"
          + (f"; leak: {leak['test_experiment']} reuses {leak['train_experiment']} shifted by {leak['shift']}" if leak else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
