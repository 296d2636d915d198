"""RxRx1-WILDS: its two split schemes over the metadata table, and its metric.

The split schemes are those of the `wilds` package (2.0.0, `wilds/datasets/rxrx1_dataset.py`),
row for row, on the table's `split` (the metadata's `dataset`) and `site` columns:

- `official`: train = site 1 of the `train` experiments; val = the `val` experiments (both sites);
  OOD test = the `test` experiments (both sites); ID test = site 2 of the `train` experiments.
- `mixed-to-test`: train = site 1 of the `train` experiments, less, per cell type, as many `train`
  experiments as the cell type has `test` experiments (the package drops those named
  `{cell type}-01`, `-02`, ...), plus site 1 of the `test` experiments; val as above; test = site
  2 of the `test` experiments. Nothing else (site 2 of the train experiments, the dropped
  experiments) is in any part.

Every well type is in every part: the WILDS metric scores control wells too. Its figures
(`wilds_metrics`) are those of the package's evaluator (`RxRx1Dataset.eval`): accuracy over the
sites of a part (`acc_avg`), per cell type (`acc_cell_type:NAME`, with `count_cell_type:NAME`),
and the worst cell type's (`acc_wg`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cellpaint.core.errors import DataError

SCHEMES = ("official", "mixed-to-test")
PARTS = {"official": ("train", "val", "test", "id_test"), "mixed-to-test": ("train", "val", "test")}


def dropped_experiments(table: pd.DataFrame) -> list[str]:
    """mixed-to-test: the train experiments it leaves out, one per test experiment of the cell type,
    named as the package names them (`HUVEC-01`, `HUVEC-02`, ...; it asserts they exist)."""
    test = sorted(table.loc[table["split"] == "test", "experiment"].unique())
    counts: dict[str, int] = {}
    for experiment in test:
        cell_type = str(experiment).split("-")[0]
        counts[cell_type] = counts.get(cell_type, 0) + 1
    train = set(table.loc[table["split"] == "train", "experiment"])
    names = [f"{cell_type}-{k:02d}" for cell_type, n in counts.items() for k in range(1, n + 1)]
    missing = [name for name in names if name not in train]
    if missing:
        raise DataError(f"--split mixed-to-test leaves out, per cell type, the train experiments numbered 01.. "
                        f"as many as its test experiments (as the wilds package does), but {missing[0]} is not a "
                        "train experiment of the data set")
    return names


def part_masks(table: pd.DataFrame, scheme: str) -> dict[str, np.ndarray]:
    """Boolean row masks of the parts of `scheme` over a site table (see the module's docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown WILDS split {scheme!r} (choose from {', '.join(SCHEMES)})")
    split, site = table["split"].to_numpy(), table["site"].to_numpy()
    val = split == "val"
    if scheme == "official":
        return {"train": (split == "train") & (site == 1), "val": val, "test": split == "test",
                "id_test": (split == "train") & (site == 2)}
    dropped = table["experiment"].isin(dropped_experiments(table)).to_numpy()
    return {"train": (((split == "train") & ~dropped) | (split == "test")) & (site == 1), "val": val,
            "test": (split == "test") & (site == 2)}


def wilds_parts(table: pd.DataFrame, scheme: str) -> dict[str, pd.DataFrame]:
    """The rows of each part of `scheme`, in table order."""
    return {name: table[mask].reset_index(drop=True) for name, mask in part_masks(table, scheme).items()}


def wilds_metrics(cell_types: np.ndarray, predicted: np.ndarray, truth: np.ndarray,
                  all_cell_types: tuple[str, ...] | None = None) -> dict[str, float | str]:
    """The WILDS evaluator's figures for predicted labels of a part's sites: `acc_avg` over all
    sites, `acc_cell_type:X` and `count_cell_type:X` for each of `all_cell_types` (the data set's;
    one without sites in the part gets 0 and 0, as there), and `acc_wg`, the lowest accuracy of a
    cell type with sites (`worst_cell_type` names it)."""
    cell_types, predicted, truth = np.asarray(cell_types).astype(str), np.asarray(predicted), np.asarray(truth)
    if not len(truth):
        return {}
    correct = predicted == truth
    result: dict[str, float | str] = {"acc_avg": float(correct.mean())}
    per_type = {}
    for cell_type in sorted(set(all_cell_types or ()) | set(cell_types)):
        mask = cell_types == cell_type
        result[f"acc_cell_type:{cell_type}"] = float(correct[mask].mean()) if mask.any() else 0.0
        result[f"count_cell_type:{cell_type}"] = float(mask.sum())
        if mask.any():
            per_type[cell_type] = result[f"acc_cell_type:{cell_type}"]
    worst = min(per_type, key=per_type.get)
    result["acc_wg"] = per_type[worst]
    result["worst_cell_type"] = worst
    return result
