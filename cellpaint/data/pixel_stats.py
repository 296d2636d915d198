"""Pixel statistics: each site's per-channel mean and std (the competition's pixel_stats.csv, or
computed once and cached), and the normalisation statistics derived from them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellpaint.core.atomic import atomic_write
from cellpaint.core.errors import DataError
from cellpaint.data.images import CHANNELS, read_site
from cellpaint.data.metadata import read_csv

NORMALIZATIONS = ("sample", "experiment", "global", "global-pooled")
MIN_STD = 0.5  # in grey levels: keeps a flat (e.g. empty) channel from being blown up by 1/std


def compute_pixel_stats(table: pd.DataFrame, channels: int = CHANNELS) -> pd.DataFrame:
    """Per-image channel mean and std, in the format of the competition's pixel_stats.csv."""
    rows = []
    for r in tqdm(table.itertuples(), total=len(table), desc="pixel stats", unit="site"):
        img = read_site(r.image_prefix, channels).reshape(channels, -1).astype(np.float64)
        for c in range(channels):
            rows.append((r.id_code, r.experiment, r.plate, r.well, r.site, c + 1,
                         img[c].mean(), img[c].std()))
    return pd.DataFrame(rows, columns=["id_code", "experiment", "plate", "well", "site", "channel",
                                       "mean", "std"])


def load_pixel_stats(data_dir: Path, table: pd.DataFrame, cache_dir: Path | None) -> pd.DataFrame:
    """pixel_stats.csv of the data set if present, else computed once and cached in `cache_dir`."""
    required = ["id_code", "site", "channel", "mean", "std"]
    given = Path(data_dir) / "pixel_stats.csv"
    if given.exists():
        return read_csv(given, required)
    cached = Path(cache_dir) / "pixel_stats.csv" if cache_dir else None
    if cached and cached.exists():
        stats = read_csv(cached, required)
        if len(stats) == len(table) * CHANNELS:
            return stats
    stats = compute_pixel_stats(table)
    if cached:
        with atomic_write(cached, "w") as f:
            stats.to_csv(f, index=False)
    return stats


def normalization_stats(table: pd.DataFrame, mode: str, pixel_stats: pd.DataFrame | None,
                        whole: pd.DataFrame | None = None) -> np.ndarray | None:
    """Per-row [2, C] (mean, std) of `table`'s sites for the precomputed normalisations; None for
    `sample`. The global modes use the sites of `whole` (the data set's whole table; default
    `table`), so that training, validation and test images get the same statistics.

    `experiment`: each experiment's statistics over all its pixels (the per-image statistics
    pooled exactly: the pooled variance is the mean of (std² + mean²) minus the squared pooled
    mean). `global`: the mean over experiments of those per-experiment means and of the
    per-experiment stds, as the 1st place computed it (each experiment counts once, and the
    spread between experiments, their batch effect, stays out of the std). `global-pooled`: the
    statistics over all pixels of all images pooled (a std 1.2-2.2x larger per channel on RxRx1).
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {mode!r} (choose from {', '.join(NORMALIZATIONS)})")
    if mode == "sample":
        return None
    sites = table if mode == "experiment" or whole is None else whole
    s = pixel_stats.merge(sites[["id_code", "site", "experiment"]].drop_duplicates(), on=["id_code", "site"],
                          suffixes=("_stats", ""))
    missing = set(zip(sites["id_code"], sites["site"])) - set(zip(s["id_code"], s["site"]))
    if missing:
        raise DataError(f"pixel statistics lack {len(missing)} site(s), e.g. {sorted(missing)[0]}")
    s = s.assign(sq=s["std"] ** 2 + s["mean"] ** 2)
    keys = ["channel"] if mode == "global-pooled" else ["experiment", "channel"]
    pooled = s.groupby(keys)[["mean", "sq"]].mean()
    pooled["std"] = np.sqrt(np.maximum(pooled["sq"] - pooled["mean"] ** 2, MIN_STD ** 2))
    if mode == "global":
        pooled = pooled.groupby("channel")[["mean", "std"]].mean()
    if mode != "experiment":
        per_row = np.broadcast_to(pooled[["mean", "std"]].to_numpy().T, (len(table), 2, len(pooled)))
        return np.ascontiguousarray(per_row, dtype=np.float32)
    wide = pooled[["mean", "std"]].unstack("channel")  # experiment x (stat, channel)
    per_exp = wide.to_numpy().reshape(len(wide), 2, -1)
    index = wide.index.get_indexer(table["experiment"])
    return per_exp[index].astype(np.float32)
