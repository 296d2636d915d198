"""Synthetic RxRx1-like data sets, so every part of cellpaint-rcic runs on a CPU without the 47 GB data.

The generator reproduces the *structure* of the real data at any scale (experiments, plates, plate groups,
controls, QC-dropped wells, two sites per well, six 8-bit channels, the HUVEC-18/RPE-03 style layout
coincidence) and draws images whose content depends on the class (channel profile + morphology), the
experiment (batch effect) and the well/site (jitter, cell positions, pixel noise), so a model has something
real to learn and must generalise across experiments.

The three layouts of SPEC.md "The data" are supported; the same config and seed give the same labels and
byte-identical images in the competition and release layouts; the wilds layout writes each site as one
RGB composite of those six channels (`composite_rgb`) and adds val experiments (drawn by cellpaint/data/synthetic_images.py; this module writes the design,
the tables and the files). No torch import here on purpose: generating data should start instantly. The command line is
synthetic.py at the top of the repository:

    python synthetic.py data/synth --layout release --classes 40 --plates 4
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from cellpaint.core.errors import UsageError
from cellpaint.data.synthetic_config import (COLUMNS, ROWS, SyntheticConfig, cell_type_of, experiment_names,
                                             leak_candidates)
from cellpaint.data.synthetic_images import (CHANNELS, class_params, composite_rgb, experiment_params, keyed_rng,
                                             render_site, well_phenotype)

GENERATOR = "cellpaint-rcic synthetic"
INFO_FILE = "synthetic_info.json"
# Everything generate() may create; only these are removed when overwriting a previous synthetic data set.
OUTPUT_NAMES = ("train", "test", "images", "train.csv", "test.csv", "train_controls.csv",
                "test_controls.csv", "metadata.csv", "pixel_stats.csv", INFO_FILE)


class OutputDirError(UsageError, FileExistsError):
    """The output directory holds something that is not a previous synthetic data set."""


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
    for exp in names["train"] + names.get("val", []) + names["test"]:
        rng = keyed_rng(config.seed, "layout", exp)
        order = rng.permutation(n_plates)
        plates = []
        for p in range(n_plates):
            content = np.array(groups[order[p]] + controls)
            plates.append((int(order[p]), [int(c) for c in content[rng.permutation(len(content))]]))
        layouts[exp] = plates

    leak = None
    if config.leak:
        cands = leak_candidates(config)
        t_exp, r_exp = cands[int(keyed_rng(config.seed, "leak").integers(len(cands)))]
        # Shift 1: plate p of the test experiment holds plate p-1 of the train one; plate 1 takes the last.
        layouts[t_exp] = [layouts[r_exp][(p - 1) % n_plates] for p in range(n_plates)]
        leak = {"test_experiment": t_exp, "train_experiment": r_exp, "shift": 1}

    rows = []
    for dataset in ("train", "val", "test"):
        for exp in names.get(dataset, []):
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
        folder = out_dir / ("images" if config.layout != "competition" else split) / exp_name / f"Plate{plate}"
        folder.mkdir(parents=True, exist_ok=True)
        for row in wells.itertuples(index=False):
            pheno = well_phenotype(cls, row.sirna, config.noise, keyed_rng(config.seed, "well", exp_name, plate, row.well))
            for site in range(1, config.sites + 1):
                img = render_site(config, pheno, exp, keyed_rng(config.seed, "site", exp_name, plate, row.well, site))
                if config.layout == "wilds":  # one RGB composite per site, as RxRx1-WILDS stores them
                    img = composite_rgb(img)
                    Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{row.well}_s{site}.png")
                for ch in range(len(img)):
                    if config.layout != "wilds":
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
        "n_images": int(len(kept) * config.sites * (1 if config.layout == "wilds" else CHANNELS)),
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
