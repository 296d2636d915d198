"""Samples: site images, normalisation, train augmentations, test-time augmentation views.

A *sample* is one site: the 6 channel PNGs of a well's site stacked into a [6, H, W] array.
Geometry (flips, transposes, zoom crops) is done on uint8 data, because it is cheaper and exact;
everything float (normalisation, per-channel scale/bias jitter) comes after, in functions that
take whole batches as well as single images so they can also run on the accelerator.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from metadata import DataError

CHANNELS = 6
NORMALIZATIONS = ("sample", "experiment", "global")
MIN_STD = 0.5  # in grey levels: keeps a flat (e.g. empty) channel from being blown up by 1/std


class ImageError(DataError):
    """A site image that is missing, unreadable or not what the data set promises."""


# ------------------------------------------------------------------------------------ decoding


def read_png(path: str) -> np.ndarray:
    """One 8-bit grayscale PNG as a [H, W] uint8 array; errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            if img.mode != "L":
                raise ImageError(f"{path}: expected an 8-bit grayscale PNG, got mode {img.mode}")
            return np.asarray(img)
    except FileNotFoundError:
        raise ImageError(f"missing image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"corrupt image: {path} ({e})") from None


def read_site(prefix: str, channels: int = CHANNELS) -> np.ndarray:
    """The `channels` PNGs `{prefix}_w{c}.png` stacked into a [C, H, W] uint8 array."""
    planes = [read_png(f"{prefix}_w{c}.png") for c in range(1, channels + 1)]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise ImageError(f"{prefix}_w*.png: channels differ in size {sorted(shapes)}")
    return np.stack(planes)


# ------------------------------------------------------------------------------- normalisation


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
    from atomic import atomic_write
    from metadata import read_csv

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


def normalization_stats(table: pd.DataFrame, mode: str, pixel_stats: pd.DataFrame | None) -> np.ndarray | None:
    """Per-row [2, C] (mean, std) for `experiment` or `global` normalisation; None for `sample`.

    Pools per-image statistics exactly: the pooled variance is the mean of (std² + mean²) minus the
    squared pooled mean, so the result equals statistics over all pixels of the images pooled.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {mode!r} (choose from {', '.join(NORMALIZATIONS)})")
    if mode == "sample":
        return None
    s = pixel_stats.merge(table[["id_code", "site", "experiment"]].drop_duplicates(), on=["id_code", "site"],
                          suffixes=("_stats", ""))
    missing = set(zip(table["id_code"], table["site"])) - set(zip(s["id_code"], s["site"]))
    if missing:
        raise DataError(f"pixel statistics lack {len(missing)} site(s), e.g. {sorted(missing)[0]}")
    s = s.assign(sq=s["std"] ** 2 + s["mean"] ** 2)
    keys = ["experiment", "channel"] if mode == "experiment" else ["channel"]
    pooled = s.groupby(keys)[["mean", "sq"]].mean()
    pooled["std"] = np.sqrt(np.maximum(pooled["sq"] - pooled["mean"] ** 2, MIN_STD ** 2))
    if mode == "global":
        per_row = np.broadcast_to(pooled[["mean", "std"]].to_numpy().T, (len(table), 2, len(pooled)))
        return np.ascontiguousarray(per_row, dtype=np.float32)
    wide = pooled[["mean", "std"]].unstack("channel")  # experiment x (stat, channel)
    per_exp = wide.to_numpy().reshape(len(wide), 2, -1)
    index = wide.index.get_indexer(table["experiment"])
    return per_exp[index].astype(np.float32)


def normalize(x: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Float images [..., C, H, W] to zero mean, unit std per channel.

    `stats` [..., 2, C] holds precomputed (mean, std); without it each image is normalised by its
    own channel statistics (the `sample` mode).
    """
    x = x.float()
    if stats is None:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True).clamp_min(MIN_STD)
    else:
        mean = stats[..., 0, :, None, None].to(x)
        std = stats[..., 1, :, None, None].to(x).clamp_min(MIN_STD)
    return (x - mean) / std


def channel_jitter(x: torch.Tensor, scale_std: float, bias_std: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-channel random gain N(1, scale_std) and offset N(0, bias_std) on normalised images."""
    if scale_std == 0 and bias_std == 0:
        return x
    shape = x.shape[:-2] + (1, 1)
    scale = 1 + scale_std * torch.randn(shape, generator=generator, device=x.device)
    bias = bias_std * torch.randn(shape, generator=generator, device=x.device)
    return x * scale + bias


# -------------------------------------------------------------------------------------- geometry


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/transposes of the last two dims (k = 0 is the identity)."""
    if k & 4:
        x = x.transpose(-2, -1)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


def random_zoom_crop(img: torch.Tensor, rng: np.random.Generator, min_scale: float) -> torch.Tensor:
    """Crop a random square-ish window whose edge is U(min_scale, 1) of the image's, resized back."""
    if min_scale >= 1:
        return img
    h, w = img.shape[-2:]
    s = rng.uniform(min_scale, 1)
    ch, cw = max(1, round(h * s)), max(1, round(w * s))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = img[..., top:top + ch, left:left + cw]
    if (ch, cw) == (h, w):
        return crop
    return TF.resize(crop, [h, w], antialias=True)


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation settings (SPEC): dihedral flips, zoom crop, per-channel gain/offset."""
    flips: bool = True
    min_scale: float = 1.0          # --scale-aug: zoom crop edge drawn from [min_scale, 1]
    scale_std: float = 0.0          # --pw-aug first value
    bias_std: float = 0.0           # --pw-aug second value

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"zoom scale must be in (0, 1], got {self.min_scale}")
        if self.scale_std < 0 or self.bias_std < 0:
            raise ValueError(f"augmentation std must be >= 0, got {self.scale_std}, {self.bias_std}")


# -------------------------------------------------------------------------------------- samples


class SiteDataset(Dataset):
    """Sites of a subset of the metadata table.

    Returns (image float32 [C, H, W], cell-type one-hot float32 [T], row index, label) where label
    is -1 when unknown. `labels` overrides the table's `sirna` (pseudo-labels). Random draws come
    from a generator seeded by (seed, epoch, index), so a sample's augmentation does not depend on
    which loader worker produced it or in what order: runs are reproducible with any worker count.
    """

    def __init__(self, rows: pd.DataFrame, cell_types: tuple[str, ...] | list[str],
                 normalization: str = "sample", stats: np.ndarray | None = None,
                 augment: Augment | None = None, labels: np.ndarray | None = None, seed: int = 0,
                 channels: int = CHANNELS) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalization!r}")
        if normalization != "sample" and (stats is None or len(stats) != len(rows)):
            raise ValueError(f"{normalization} normalisation needs one stats row per sample")
        unknown = set(rows["cell_type"]) - set(cell_types)
        if unknown:
            raise DataError(f"cell type(s) {sorted(unknown)} not among {list(cell_types)}")
        self.prefixes = rows["image_prefix"].to_numpy()
        self.cell_index = pd.Index(list(cell_types)).get_indexer(rows["cell_type"])
        self.n_cell_types = len(cell_types)
        self.labels = np.asarray(rows["sirna"] if labels is None else labels, dtype=np.int64)
        self.stats = None if stats is None else torch.from_numpy(np.asarray(stats, dtype=np.float32))
        self.normalization = normalization
        self.augment = augment
        self.seed = seed
        self.channels = channels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation draws (call before making the epoch's loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.prefixes)

    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The uint8 [C, H, W] image of sample `index`, with the geometric augmentations if `rng`."""
        img = torch.from_numpy(read_site(self.prefixes[index], self.channels))
        if rng is not None and self.augment is not None:
            if self.augment.flips:
                img = dihedral(img, int(rng.integers(8)))
            img = random_zoom_crop(img, rng, self.augment.min_scale)
        return img.contiguous()

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.augment else None
        img = self.load(index, rng)
        x = normalize(img, None if self.stats is None else self.stats[index])
        if rng is not None:
            g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
            x = channel_jitter(x, self.augment.scale_std, self.augment.bias_std, g)
        cell = torch.zeros(self.n_cell_types)
        cell[self.cell_index[index]] = 1
        return x, cell, index, int(self.labels[index])


# ------------------------------------------------------------------------- test-time augmentation


def tta_views(x: torch.Tensor, n: int, size: float = 1.0) -> list[torch.Tensor]:
    """`n` distinct views of a batch [B, C, H, W]: the 8 flips/transposes, then shifted crops.

    With `size` = 1 the views are the dihedral transforms, identity first (so n <= 8). With
    `size` < 1 each view is a crop of that fraction of the edge (centre first, then the four
    corners), each crop in its 8 dihedral forms: up to 40 views. Crops are not resized: the
    model pools adaptively, and resizing would change the apparent cell size.
    """
    h, w = x.shape[-2:]
    if not 0 < size <= 1:
        raise ValueError(f"--tta-size must be in (0, 1], got {size}")
    if size == 1:
        windows = [(0, 0, h, w)]
    else:
        ch, cw = max(1, round(h * size)), max(1, round(w * size))
        windows = [((h - ch) // 2, (w - cw) // 2, ch, cw), (0, 0, ch, cw), (0, w - cw, ch, cw),
                   (h - ch, 0, ch, cw), (h - ch, w - cw, ch, cw)]
    if not 1 <= n <= 8 * len(windows):
        raise ValueError(f"--tta {n}: between 1 and {8 * len(windows)} views are possible with "
                         f"--tta-size {size}")
    views = []
    for i in range(n):
        top, left, ch, cw = windows[i // 8]
        views.append(dihedral(x[..., top:top + ch, left:left + cw], i % 8))
    return views
