"""The configuration of a synthetic data set (synthetic.py's flags), and the experiment names it
implies. cellpaint/data/synthetic.py designs and writes the set; synthetic_images.py draws it."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ROWS = "BCDEFGHIJKLMNO"            # rows B..O of a 384-well plate (A and P are unused in RxRx1)
COLUMNS = range(2, 24)             # columns 02..23
MAX_WELLS = len(ROWS) * len(COLUMNS)  # 308, exactly the used wells of a real plate
LAYOUTS = ("competition", "release", "wilds")


@dataclass
class SyntheticConfig:
    """All knobs of a synthetic data set. `signal`, `batch_effect` and `noise` scale built-in strengths (1 = tuned default)."""
    layout: str = "competition"
    cell_types: tuple[str, ...] = ("HEPG2", "HUVEC", "RPE", "U2OS")
    train_experiments: tuple[int, ...] = (3, 3, 3, 3)  # per cell type
    test_experiments: tuple[int, ...] = (1, 1, 1, 1)   # per cell type, numbered after the train (and val) ones
    val_experiments: tuple[int, ...] = ()              # per cell type, numbered after the train ones: wilds only
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
        self.val_experiments = tuple(int(n) for n in self.val_experiments)

    @property
    def wells_per_plate(self) -> int:
        return self.classes // max(self.plates, 1) + self.positive_controls + self.negative_wells

    def validate(self) -> None:
        """Raise ValueError with a message naming the CLI flag when the config cannot describe a data set."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(self.layout in LAYOUTS, f"--layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        need(len(self.cell_types) > 0, "--cell-types must name at least one cell type")
        need(len(set(self.cell_types)) == len(self.cell_types), "--cell-types must not repeat a name")
        for ct in self.cell_types:
            need(bool(re.fullmatch(r"[A-Za-z0-9]+", ct)), f"--cell-types: {ct!r} must be letters/digits only (no '-' or '_')")
        for flag, counts in (("--train-experiments", self.train_experiments), ("--test-experiments", self.test_experiments)):
            need(len(counts) == len(self.cell_types),
                 f"{flag} needs one count per cell type ({len(self.cell_types)}), got {len(counts)}")
            need(all(0 <= n for n in counts), f"{flag} counts must be >= 0")
        if self.layout == "wilds":
            need(len(self.val_experiments) in (0, len(self.cell_types)),
                 f"--val-experiments needs one count per cell type ({len(self.cell_types)}), got {len(self.val_experiments)}")
            need(all(0 <= n for n in self.val_experiments), "--val-experiments counts must be >= 0")
        else:
            need(not any(self.val_experiments), "--val-experiments: only the wilds layout has val experiments")
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
            need(bool(leak_candidates(self)),
                 "--leak needs a test experiment and a train experiment of a different cell type; use --no-leak")


def experiment_names(config: SyntheticConfig) -> dict[str, list[str]]:
    """{'train': [...], 'test': [...]} (and 'val' when there are val experiments): per cell type,
    train experiments first, then val (as RxRx1-WILDS numbers them), then test."""
    vals = config.val_experiments or (0,) * len(config.cell_types)
    out: dict[str, list[str]] = {"train": [], "test": []}
    if any(vals):
        out["val"] = []
    for ct, n_train, n_val, n_test in zip(config.cell_types, config.train_experiments, vals, config.test_experiments):
        out["train"] += [f"{ct}-{i:02d}" for i in range(1, n_train + 1)]
        if n_val:
            out["val"] += [f"{ct}-{i:02d}" for i in range(n_train + 1, n_train + n_val + 1)]
        first = n_train + n_val + 1
        out["test"] += [f"{ct}-{i:02d}" for i in range(first, first + n_test)]
    return out


def leak_candidates(config: SyntheticConfig) -> list[tuple[str, str]]:
    names = experiment_names(config)
    return [(t, r) for t in names["test"] for r in names["train"] if cell_type_of(t) != cell_type_of(r)]


def cell_type_of(experiment: str) -> str:
    """HEPG2-01 -> HEPG2: the cell type is the experiment name before the dash."""
    return experiment.split("-")[0]
