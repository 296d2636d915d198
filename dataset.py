"""Samples: site images, normalisation, batches, test-time augmentation views (augmentations: augment.py).

A *sample* is one site: its C channels (as the data stores them: images.SiteFiles) in a [C, H, W] array.

Two ways to turn a site into network input, with the same maths:

- ``SiteDataset(..., output="uint8")`` (the default, what main.py uses): the loader workers only decode
  (or read the decoded cache, `ImageCache`) and draw the sample's random augmentation; they
  return the uint8 image and those draws. `prepare_batch` then does everything else on whole
  batches on the accelerator: flips/transposes, the zoom crop (crop, then resize in float), the
  optional rotation and gamma, normalisation, the per-channel gain/offset jitter and the optional
  brightness/contrast. CPU work per sample is decoding alone.
- ``output="float"``: the same steps one sample at a time on the CPU (the tests' reference; slow).

Random draws come from a generator seeded by (seed, epoch, index): a sample's augmentation does
not depend on which worker produced it, in what order, or which of the two outputs is used.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from cellpaint.core.errors import DataError
from cellpaint.core.settings import AugmentSettings
from cellpaint.data.augment import (apply_geometry, channel_jitter, dihedral, draw_photometric, draw_zoom_box,
                                    jitter_draws, normalised_photometric, raw_photometric, zoom)
from cellpaint.data.image_cache import CacheError, ImageCache
from cellpaint.data.images import ImageError, SiteFiles, discover, read_site
from cellpaint.data.pixel_stats import MIN_STD, NORMALIZATIONS
from cellpaint.data.sampling import domain_keys

OUTPUTS = ("float", "uint8")

log = logging.getLogger("cellpaint")


# ------------------------------------------------------------------------------- normalisation


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


# ---------------------------------------------------------------------------------- batches


def prepare_batch(batch: dict | torch.Tensor, device: torch.device | str,
                  non_blocking: bool = True, zoom_mode: str = "nearest",
                  settings: AugmentSettings | None = None) -> torch.Tensor:
    """Network input on `device`: float [B, C, H, W] from a collated batch of ``output="uint8"`` samples.

    The batch says what is to be done (the dataset puts in exactly what its settings need):
    ``image`` uint8 [B, C, H, W]; ``geometry`` [B, 5] flips/transposes and zoom crop windows;
    ``stats`` [B, 2, C] mean and std for `experiment`/`global` normalisation (without it each
    image is normalised by its own statistics); ``jitter`` [B, 2, C] per-channel gains and offsets;
    ``photometric`` [B, 4 or 5] (angle, gamma, contrast, brightness[, rescale]), see
    `augment.draw_photometric`. `settings` (the dataset's `AugmentSettings`) says how the draws are applied
    (zoom interpolation, rotation border, brightness/contrast space); without it, the defaults.
    A float tensor (``output="float"`` samples) is only moved to `device`.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking).float()
    x = batch["image"].to(device, non_blocking=non_blocking).float()
    if "geometry" in batch:
        x = apply_geometry(x, batch["geometry"], settings.zoom_mode if settings else zoom_mode)
    photo = batch.get("photometric")  # kept on the CPU: the functions test for no-ops without a device sync
    if photo is not None:
        x = raw_photometric(x, photo, settings)
    stats = batch.get("stats")
    x = normalize(x, None if stats is None else stats.to(device, non_blocking=non_blocking))
    if "jitter" in batch:
        x = channel_jitter(x, draws=batch["jitter"].to(device, non_blocking=non_blocking))
    if photo is not None:
        x = normalised_photometric(x, photo, settings)
    return x


class SiteSizeError(DataError):
    """Sites of one batch whose images differ in size."""


def _image_shape(x) -> tuple[int, ...]:
    return tuple((x["image"] if isinstance(x, dict) else x).shape)


def collate_skipping(batch: list, prefixes=None, hint: str = "") -> tuple:
    """`default_collate` of the samples that could be read: the usual (x, cell, index, label) plus
    the number of samples dropped (None entries, see ``SiteDataset(skip_bad_images=True)``).

    A batch with nothing left collates to (None, None, None, None, skipped). Sites of different
    sizes cannot be stacked: a `SiteSizeError` names two of them (by their path prefix among
    `prefixes`, the dataset's, when given) and adds `hint`.
    """
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, None, None, skipped
    shapes = [_image_shape(sample[0]) for sample in good]
    other = next((k for k, shape in enumerate(shapes) if shape != shapes[0]), None)
    if other is not None:
        def name(k: int) -> str:
            index = good[k][2]
            return str(prefixes[index]) if prefixes is not None else f"sample {index}"

        size = lambda shape: "x".join(map(str, shape[-2:]))  # noqa: E731
        raise SiteSizeError(f"the sites of a batch differ in size ({name(0)}: {size(shapes[0])}, "
                            f"{name(other)}: {size(shapes[other])}){hint}")
    return (*default_collate(good), skipped)


class SkippingLoader(DataLoader):
    """A DataLoader collating with `collate_skipping`: yields the usual (x, cell, index, label)
    batches, counts the samples dropped for unreadable images in `skipped` (per pass over the
    data, i.e. per epoch for a training loader) and logs that count at the end of the pass.
    `size_hint` ends the message of a batch whose sites differ in size.
    """

    def __init__(self, dataset: SiteDataset, *args, description: str = "pass", size_hint: str = "",
                 **kwargs) -> None:
        collate = functools.partial(collate_skipping, prefixes=getattr(dataset, "prefixes", None), hint=size_hint)
        super().__init__(dataset, *args, collate_fn=collate, **kwargs)
        self.description = description
        self.skipped = 0

    def __iter__(self):
        self.skipped = 0
        for *batch, skipped in super().__iter__():
            self.skipped += skipped
            if batch[0] is not None:
                yield tuple(batch)
        if self.skipped:
            log.warning("%s: %d site(s) with unreadable images skipped", self.description, self.skipped)


# -------------------------------------------------------------------------------------- samples


class SiteDataset(Dataset):
    """Sites of a subset of the metadata table.

    Returns (x, cell-type one-hot float32 [T], row index, label) where label is -1 when unknown;
    `labels` overrides the table's `sirna` (pseudo-labels). x depends on `output`:

    - ``"float"``: the network input, float32 [C, H, W], made here on the CPU;
    - ``"uint8"``: a dict for `prepare_batch` (after collation): ``image`` uint8 [C, H, W] as decoded,
      and what the settings need: ``geometry`` [5] (flip/transpose k, zoom window), ``jitter``
      [2, C] (gains, offsets), ``photometric`` [4 or 5] (rotation, gamma, contrast, brightness[, rescale]),
      ``stats`` [2, C] (mean, std of `experiment`/`global` normalisation).

    Both give the same result for a sample. Random draws come from a generator seeded by (seed,
    epoch, index), so a sample's augmentation does not depend on which loader worker produced it
    or in what order: runs are reproducible with any worker count.

    `cache`: read decoded sites from an `ImageCache` instead of the PNGs. `skip_bad_images`: a
    site whose image is missing or corrupt is logged (a warning naming the file) and returned as
    None, for `collate_skipping` to drop; otherwise it raises an `ImageError` naming the file.
    """

    def __init__(self, rows: pd.DataFrame, cell_types: tuple[str, ...] | list[str],
                 normalization: str = "sample", stats: np.ndarray | None = None,
                 augment: AugmentSettings | None = None, labels: np.ndarray | None = None, seed: int = 0,
                 files: SiteFiles | None = None, output: str = "uint8", cache: ImageCache | None = None,
                 skip_bad_images: bool = False) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalization!r}")
        if normalization != "sample" and (stats is None or len(stats) != len(rows)):
            raise ValueError(f"{normalization} normalisation needs one stats row per sample")
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r} (choose from {', '.join(OUTPUTS)})")
        unknown = set(rows["cell_type"]) - set(cell_types)
        if unknown:
            raise DataError(f"cell type(s) {sorted(unknown)} not among {list(cell_types)}")
        self.prefixes = rows["image_prefix"].to_numpy()
        # each site's experiment and plate, where the rows name them: same-plate batches, AdaBN
        self.domains = rows[["experiment", "plate"]].reset_index(drop=True) \
            if {"experiment", "plate"} <= set(rows.columns) else None
        self.cell_index = pd.Index(list(cell_types)).get_indexer(rows["cell_type"])
        self.n_cell_types = len(cell_types)
        self.labels = np.asarray(rows["sirna"] if labels is None else labels, dtype=np.int64)
        self.stats = None if stats is None else torch.from_numpy(np.asarray(stats, dtype=np.float32))
        self.normalization = normalization
        self.augment = augment
        self.seed = seed
        # how the sites are stored (the run passes the data set's); None: as the first sites' files say
        self.files = files if files is not None or not len(rows) else discover(self.prefixes)
        self.channels = self.files.channels if self.files is not None else 0
        self.output = output
        self.skip_bad_images = skip_bad_images
        self.cache = cache
        self.location = None
        if cache is not None:
            if self.files is not None and cache.channels != self.channels:
                raise CacheError(f"image cache {cache.root} holds {cache.channels} channels, not {self.channels}")
            self.location = cache.locate(rows)
        self.epoch = 0

    def domain_keys(self, by: str) -> np.ndarray:
        """Each sample's plate or experiment (`sampling.domain_keys`)."""
        if self.domains is None:
            raise ValueError("the rows of this dataset name no experiment and plate")
        return domain_keys(self.domains, by)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation draws (call before making the epoch's loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.prefixes)

    def image(self, index: int) -> np.ndarray:
        """The uint8 [C, H, W] image of sample `index` as decoded (from the cache if there is one)."""
        if self.location is None:
            return read_site(self.prefixes[index], self.files)
        file_id, row, bad = (a[index] for a in self.location)
        if bad is not None:
            raise ImageError(bad)
        return self.cache.read(file_id, row)

    def _geometry(self, rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, tuple[int, int, int, int]]:
        # 8 dihedral transforms, or (no transposes) the 4 of bits 0-1: a fair coin per axis flip
        k = int(rng.integers(8 if self.augment.transposes else 4)) if self.augment.flips else 0
        h, w = shape[-2:] if not k & 4 else shape[-2:][::-1]
        return k, draw_zoom_box(rng, h, w, self.augment.min_scale)

    def _jitter_generator(self, rng: np.random.Generator) -> torch.Generator:
        return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))

    def _float(self, img: np.ndarray, index: int, rng: np.random.Generator | None) -> torch.Tensor:
        x = torch.from_numpy(img).float()
        photo = None
        if rng is not None:  # draws in the order of _raw: geometry, jitter seed, photometric
            k, box = self._geometry(rng, x.shape)
            x = zoom(dihedral(x, k), box, self.augment.zoom_mode)
            g = self._jitter_generator(rng)
            if self.augment.photometric:
                photo = draw_photometric(self.augment, rng)[None]
                x = raw_photometric(x[None], photo, self.augment)[0]
        x = normalize(x, None if self.stats is None else self.stats[index])
        if rng is not None:
            x = channel_jitter(x, self.augment.scale_std, self.augment.bias_std, g)
        if photo is not None:
            x = normalised_photometric(x[None], photo, self.augment)[0]
        return x.contiguous()

    def _raw(self, img: np.ndarray, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        raw = {"image": torch.from_numpy(img)}
        if rng is not None:
            k, box = self._geometry(rng, img.shape)
            if self.augment.geometric:
                raw["geometry"] = torch.tensor([k, *box], dtype=torch.int64)
            g = self._jitter_generator(rng)
            if self.augment.jitter:
                raw["jitter"] = jitter_draws((self.channels,), self.augment.scale_std, self.augment.bias_std, g)
            if self.augment.photometric:  # after every earlier draw: runs without it are unchanged
                raw["photometric"] = draw_photometric(self.augment, rng)
        if self.stats is not None:
            raw["stats"] = self.stats[index]
        return raw

    def __getitem__(self, index: int):
        try:
            img = self.image(index)
        except ImageError as e:
            if not self.skip_bad_images:
                raise
            log.warning("skipping site %s: %s", self.prefixes[index], e)
            return None
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.augment else None
        x = self._float(img, index, rng) if self.output == "float" else self._raw(img, index, rng)
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
