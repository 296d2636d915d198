"""The data of a run: metadata table -> subsets -> datasets -> this process's loaders.

`load_data` reads the table and derives what a run needs once (structure, layout coincidences,
folds and subsets, pixel statistics, the image cache); `make_dataset` and `make_loader` turn rows
of it into the samples and batches the loops read.
"""
from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import dataset
from cellpaint.core.errors import DataError, UsageError
from cellpaint.core.settings import AUTO, AugmentSettings, DataSettings, ExecSettings, Settings
from cellpaint.data import metadata, pixel_stats, wilds
from cellpaint.data.folds import (assign_folds, last_experiments, named_folds, only_experiments, split_subsets,
                                 wilds_subsets)
from cellpaint.data.images import SiteFiles, png_size
from cellpaint.data.image_cache import ImageCache
from cellpaint.data.layout_matches import apply_layout_matches, find_layout_matches
from cellpaint.data.structure import Structure, derive_structure
from cellpaint.engine import distributed

log = logging.getLogger("cellpaint")


@dataclass
class Data:
    table: pd.DataFrame
    structure: Structure
    subsets: dict[str, pd.DataFrame]   # train, val, test (and id_test: the official WILDS split)
    pixel_stats: pd.DataFrame | None
    image_cache: ImageCache | None = None  # --image-cache, opened and checked once per run
    files: SiteFiles | None = None      # how the sites are stored, and their channel count (from the data)
    split: str = "folds"                # "folds", or the RxRx1-WILDS scheme of the subsets

    @property
    def wilds(self) -> bool:
        """The subsets are an RxRx1-WILDS split: every well type in each part, scored as WILDS scores."""
        return self.split in wilds.SCHEMES

    @property
    def channels(self) -> int:
        return self.files.channels


def split_scheme(d: DataSettings, layout: str) -> str:
    """The split `--split` stands for on this layout; flags that choose folds do not fit a WILDS
    split, nor a WILDS split the other layouts (a UsageError names them)."""
    split = d.split if d.split != AUTO else ("official" if layout == "wilds" else "folds")
    if split in wilds.SCHEMES:
        if layout != "wilds":
            raise UsageError(f"--split {split} is an RxRx1-WILDS split, but {d.root} is in the {layout} layout "
                             "(its validation experiments are dealt in folds: --split folds)")
        chosen = [flag for flag, on in (("--val-experiments", d.val_experiments),
                                        ("--val-last-experiment", d.val_last_experiment),
                                        (f"--cv-number {d.cv_number}", d.cv_number != 0)) if on]
        if chosen:
            raise UsageError(f"{', '.join(chosen)} choose(s) validation folds; the RxRx1-WILDS split {split} has its "
                             "own validation experiments (dataset = val): drop it")
    elif layout == "wilds":
        raise UsageError(f"--split {split}: {d.root} is RxRx1-WILDS; its splits are {' and '.join(wilds.SCHEMES)}")
    return split


def load_data(d: DataSettings, x: ExecSettings = ExecSettings(), training: bool = True) -> Data:
    """Metadata table, derived structure, layout coincidences and the train/val/test subsets
    (`training`: warn when fine-tuning one cell type leaves nothing to validate); the pixel
    statistics and the image cache where `x` asks for them."""
    table = metadata.load_table(d.root)
    split = split_scheme(d, metadata.detect_layout(d.root))
    try:
        files = metadata.site_files(d.root, table)
    except DataError:
        if not x.image_cache:
            raise
        files = None  # only the decoded-image cache was copied here: its manifest gives the channels
    cache = ImageCache.open(x.image_cache, d.root, table, files) if x.image_cache else None
    if files is None:
        files = SiteFiles(cache.channels, composite=metadata.detect_layout(d.root) == "wilds", present=False)
    matches = find_layout_matches(table)
    for m in matches:
        log.info("layout coincidence: test %s repeats train %s with plates shifted by %d (%d control wells) "
                 "-> %s", m.test, m.train, m.shift, m.wells_compared, "used" if d.use_layout_leak else "not used")
    if d.use_layout_leak and matches:
        table = apply_layout_matches(table, matches)
    structure = derive_structure(table, d.classes)
    if split in wilds.SCHEMES:
        subsets = wilds_subsets(table, split, d.all_controls_train)
        extras = [what for what, on in (("the control wells of val and test experiments (--all-controls-train)",
                                         d.all_controls_train),
                                        ("test wells labelled by a layout coincidence (--use-layout-leak)",
                                         d.use_layout_leak and bool(matches))) if on]
        if extras:
            log.warning("RxRx1-WILDS %s split: training also on %s: not a standard-track entry (the standard track "
                        "uses no val or test data in training; recipes/wilds-standard.args)", split, " and ".join(extras))
    else:
        if d.val_last_experiment:  # the 41st place's split: each cell type's last train experiment
            folds, cv_number = named_folds(table, last_experiments(table)), 0
            alone = only_experiments(table)
            if training and alone:
                log.warning("--val-last-experiment validates on %s, the only train experiment of %s: no treatment "
                            "well of %s is trained on (use --val-experiments to choose others)",
                            ", ".join(alone.values()), ", ".join(alone),
                            "that cell type" if len(alone) == 1 else "those cell types")
        elif d.val_experiments:
            folds, cv_number = named_folds(table, d.val_experiments), 0
        else:
            folds, cv_number = assign_folds(table, d.folds, d.data_split_seed), d.cv_number
        subsets = split_subsets(table, folds, cv_number, d.all_controls_train)
    if not d.train_controls:  # treatment wells only (the 41st place trained on train.csv alone)
        train = subsets["train"]
        subsets["train"] = train[train["well_type"] == metadata.TREATMENT].reset_index(drop=True)
    if d.finetune_cell_type:
        if d.finetune_cell_type not in structure.cell_types:
            raise UsageError(f"--finetune-cell-type {d.finetune_cell_type}: not among the cell types "
                             f"{', '.join(structure.cell_types)}")
        # train, validate, pseudo-label and predict this cell type only; the model keeps its
        # full class and cell-type outputs so a general checkpoint loads unchanged
        subsets = {k: v[v["cell_type"] == d.finetune_cell_type].reset_index(drop=True) for k, v in subsets.items()}
        if training and subsets["val"].empty:
            log.warning("--finetune-cell-type %s: the validation experiments hold none of its wells, so nothing "
                        "is validated and the best checkpoint is simply the latest epoch (choose a fold with "
                        "--cv-number or --val-experiments, or --val-last-experiment)", d.finetune_cell_type)
    log.info("data %s: %d sites, %d classes (%d treatment in %d plate groups), cell types %s; "
             "sites: train %d, val %d, test %d", d.root, len(table), structure.n_classes,
             len(structure.treatment_classes), structure.n_groups, ",".join(structure.cell_types),
             *(len(subsets[k]) for k in ("train", "val", "test")))
    if split != "folds":
        log.info("RxRx1-WILDS %s split: %s; images: %s", split,
                 ", ".join(f"{k} {len(v)} sites" for k, v in subsets.items()), files.describe())
    stats = None
    if d.normalization != "sample":
        if x.stats_cache is None:
            raise UsageError(f"--data-normalization {d.normalization} needs a folder for the pixel "
                             "statistics: give --cache-dir")
        stats = pixel_stats.load_pixel_stats(d.root, table, x.stats_cache, files)
    return Data(table, structure, subsets, stats, cache, files, split)


def site_image_size(data: Data) -> tuple[int, int] | None:
    """(height, width) of the run's images: the cache's, or the first training site's PNG header."""
    if data.image_cache is not None:
        return data.image_cache.size
    rows = next((r for r in (data.subsets["train"], data.table) if len(r)), None)
    return None if rows is None else png_size(data.files.first(rows["image_prefix"].iloc[0]))


def make_dataset(s: Settings, data: Data, rows: pd.DataFrame, augment: AugmentSettings | None = None,
                 labels=None) -> dataset.SiteDataset:
    """The sites `rows`; training draws `augment` (None: inference)."""
    stats = pixel_stats.normalization_stats(rows, s.data.normalization, data.pixel_stats, data.table)
    # uint8 samples: the loader workers only decode; prepare_batch does the float work per batch on the device.
    return dataset.SiteDataset(rows, data.structure.cell_types, s.data.normalization, stats,
                               augment, labels, seed=s.seed, files=data.files, output="uint8",
                               cache=data.image_cache, skip_bad_images=s.exec.skip_bad_images)


def make_loader(s: Settings, world: distributed.World, ds: dataset.SiteDataset,
                epoch: int | None = None, subset: np.ndarray | None = None) -> DataLoader:
    """This process's share of `ds`: shuffled (seeded by seed and epoch, so a resumed run draws the
    same order) when `epoch` is given, in order otherwise (only the positions `subset`, when
    given). A training sampler holds whole batches only (the trailing partial one is dropped,
    unless it is all there is): see ShardSampler; with --batch-sampling plate|experiment each
    batch comes from one plate (experiment): see GroupBatchSampler."""
    batch_size = s.data.batch_size
    batching: dict = {"batch_size": batch_size}
    if epoch is not None:
        ds.set_epoch(epoch)
        seed = s.seed * 100_003 + epoch
        if s.data.batch_sampling == "random":
            batching["sampler"] = distributed.ShardSampler(len(ds), world, seed, batch=batch_size)
        else:
            batching = {"batch_sampler": distributed.GroupBatchSampler(
                ds.domain_keys(s.data.batch_sampling), world, seed, batch_size)}
    elif subset is None:
        batching["sampler"] = distributed.ShardSampler(len(ds), world)
    else:
        batching["sampler"] = np.asarray(subset)[world.rank::world.size].tolist()
    # batches drop (and count, logging the count per pass) sites whose images are unreadable (--skip-bad-images)
    return dataset.SkippingLoader(ds, **batching, num_workers=s.exec.num_workers,
                                  pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                                  description="inference" if epoch is None else f"epoch {epoch}",
                                  size_hint=f"; python main.py --mode check --data {s.data.root} names the images")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode PNGs; many threads each would only fight over cores
    # Ctrl-C reaches the whole process group: the main process stops the run (one line, exit 130)
    # and shuts the workers down; each worker's own KeyboardInterrupt traceback would bury that line
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the same for a SIGTERM sent to the whole group (cli/entry.py)
    sys.excepthook = _quiet_when_main_stops


def _quiet_when_main_stops(kind, error, trace) -> None:
    """A worker hands each batch's tensors over through multiprocessing's resource sharer; when the
    main process stops (Ctrl-C, SIGTERM) in the middle of such a hand-over, the sharer's thread in
    the worker reports the broken connection through sys.excepthook, a traceback under the run's one
    line. Only that case is silenced: the worker loop's own errors reach the main process anyway."""
    frames, step = [], trace
    while step is not None:
        frames.append(step.tb_frame.f_code.co_filename)
        step = step.tb_next
    if issubclass(kind, (EOFError, ConnectionError)) and any(f.endswith("resource_sharer.py") for f in frames):
        return
    sys.__excepthook__(kind, error, trace)
