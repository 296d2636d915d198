"""Pixel statistics: each site's per-channel mean and std (the competition's pixel_stats.csv, or
computed once and cached), and the normalisation statistics derived from them.

Both are checked on reading (`check_pixel_stats`): channels 1..C, each site once per channel, means
and stds finite numbers of the 8-bit range, problems named by file and line. The computed cache
(`<cache>/pixel_stats.csv`) records what it was computed from beside it (`pixel_stats.json`: the
sites and each plate's image fingerprint, data/source_files.py), and is computed again, with a
warning naming it, when those changed: another data set with the same ids, images regenerated.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellpaint.core.atomic import atomic_write, write_text
from cellpaint.core.errors import DataError
from cellpaint.data.images import SiteFiles, discover, read_site
from cellpaint.data.metadata import read_csv
from cellpaint.data.source_files import changed, plate_sources

log = logging.getLogger("cellpaint")

NORMALIZATIONS = ("sample", "experiment", "global", "global-pooled")
MIN_STD = 0.5  # in grey levels: keeps a flat (e.g. empty) channel from being blown up by 1/std
REQUIRED = ["id_code", "site", "channel", "mean", "std"]
CACHE_FORMAT = "cellpaint-rcic-pixel-stats/1"
PIXEL_RANGE = 255.0  # 8-bit images: a mean or std outside [0, 255] cannot be right


def compute_pixel_stats(table: pd.DataFrame, files: SiteFiles | None = None) -> pd.DataFrame:
    """Per-image channel mean and std, in the format of the competition's pixel_stats.csv, for the
    channels of `files` (None: as the sites' files say)."""
    files = files or discover(table["image_prefix"].to_numpy())
    channels = files.channels
    rows = []
    for r in tqdm(table.itertuples(), total=len(table), desc="pixel stats", unit="site"):
        img = read_site(r.image_prefix, files).reshape(channels, -1).astype(np.float64)
        for c in range(channels):
            rows.append((r.id_code, r.experiment, r.plate, r.well, r.site, c + 1,
                         img[c].mean(), img[c].std()))
    return pd.DataFrame(rows, columns=["id_code", "experiment", "plate", "well", "site", "channel",
                                       "mean", "std"])


def _line(stats: pd.DataFrame, mask: np.ndarray) -> int:
    """The file line (the header is line 1) of the first row where `mask` holds."""
    return int(stats.index[int(np.argmax(mask))]) + 2


def check_pixel_stats(stats: pd.DataFrame, path: Path, channels: int) -> pd.DataFrame:
    """`stats` (read from `path`) with numeric columns, or a DataError naming the file, the line and
    what is wrong: a channel outside 1..C, a mean or std that is not a number of the 8-bit range
    (NaN, inf, negative, 'abc'), a site listed twice for a channel or with another channel count."""
    stats = stats.copy()
    for column in ("channel", "site", "mean", "std"):
        values = pd.to_numeric(stats[column], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            shown = stats[column].iloc[int(np.argmax(bad))]
            raise DataError(f"{path} line {_line(stats, bad)}, column {column}: "
                            f"{'an empty value' if pd.isna(shown) else repr(str(shown))} is not a number")
        stats[column] = values
    for column in ("channel", "site"):
        bad = (stats[column] != np.round(stats[column])).to_numpy()
        if bad.any():
            raise DataError(f"{path} line {_line(stats, bad)}, column {column}: "
                            f"{stats[column].iloc[int(np.argmax(bad))]} is not an integer")
        stats[column] = stats[column].astype(np.int64)
    bad = ~stats["channel"].between(1, channels).to_numpy()
    if bad.any():
        raise DataError(f"{path} line {_line(stats, bad)}: channel {stats['channel'].iloc[int(np.argmax(bad))]} "
                        f"is not one of the images' channels 1..{channels}")
    for column in ("mean", "std"):
        values = stats[column].to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(values) & (values >= 0) & (values <= PIXEL_RANGE))
        if bad.any():
            raise DataError(f"{path} line {_line(stats, bad)}, column {column}: {values[int(np.argmax(bad))]} is not "
                            f"a {column} of 8-bit pixels (a finite number in [0, {PIXEL_RANGE:g}])")
    stats["id_code"] = stats["id_code"].astype(str)
    twice = stats.duplicated(["id_code", "site", "channel"]).to_numpy()
    if twice.any():
        row = stats.iloc[int(np.argmax(twice))]
        raise DataError(f"{path} line {_line(stats, twice)}: {row['id_code']} site {row['site']} channel "
                        f"{row['channel']} is listed twice")
    counts = stats.groupby(["id_code", "site"], sort=False)["channel"].transform("size").to_numpy()
    bad = counts != channels
    if bad.any():
        row = stats.iloc[int(np.argmax(bad))]
        raise DataError(f"{path} line {_line(stats, bad)}: {row['id_code']} site {row['site']} has "
                        f"{counts[int(np.argmax(bad))]} channel(s), the images have {channels}")
    return stats


def _site_fingerprint(table: pd.DataFrame) -> str:
    keys = table[["id_code", "site"]].astype(str).sort_values(["id_code", "site"])
    return hashlib.sha256(keys.to_csv(index=False).encode()).hexdigest()[:20]


def _stale(record_path: Path, table: pd.DataFrame, sources: dict) -> str | None:
    """Why the cached statistics beside `record_path` do not belong to `table`'s images; None when they do."""
    try:
        record = json.loads(record_path.read_text())
        if record.get("format") != CACHE_FORMAT or not isinstance(record.get("plates"), dict):
            raise ValueError
    except FileNotFoundError:
        return f"{record_path} is missing (computed before caches recorded their sources)"
    except (OSError, ValueError, AttributeError):
        return f"{record_path} is unreadable"
    if record.get("sites") != _site_fingerprint(table):
        return f"it was computed for other sites (the data set {record.get('data')})"
    stale = changed(record["plates"], sources)
    if stale:
        return f"the images of {len(stale)} plate(s) changed since (e.g. {stale[0]})"
    return None


def load_pixel_stats(data_dir: Path, table: pd.DataFrame, cache_dir: Path | None,
                     files: SiteFiles | None = None) -> pd.DataFrame:
    """pixel_stats.csv of the data set if present, else computed once and cached in `cache_dir`
    (computed again when the cache belongs to other sites or images); `files`: how the sites are
    stored (None: as the sites' files say)."""
    files = files or discover(table["image_prefix"].to_numpy())
    given = Path(data_dir) / "pixel_stats.csv"
    if given.exists():
        return check_pixel_stats(read_csv(given, REQUIRED), given, files.channels)
    cached = Path(cache_dir) / "pixel_stats.csv" if cache_dir else None
    record = cached.with_suffix(".json") if cached else None
    sources = plate_sources(table, files) if cached else {}
    if cached and cached.exists():
        why = _stale(record, table, sources)
        if why is None:
            return check_pixel_stats(read_csv(cached, REQUIRED), cached, files.channels)
        log.warning("pixel-statistics cache %s is stale (%s): computing it again", cached, why)
    stats = compute_pixel_stats(table, files)
    if cached:
        with contextlib.suppress(FileNotFoundError):
            record.unlink()  # no moment shows the new record beside old statistics
        with atomic_write(cached, "w") as f:
            stats.to_csv(f, index=False)
        write_text(record, json.dumps({"format": CACHE_FORMAT, "data": str(Path(data_dir).resolve()),
                                       "sites": _site_fingerprint(table),
                                       "plates": {k: v.digest for k, v in sources.items()}}, indent=1) + "\n")
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
