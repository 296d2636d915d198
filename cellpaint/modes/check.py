"""Validate a data set before a long run: metadata, labels, and every image.

    python main.py --mode check --data DIR [--num-data-workers N]

Problems are collected rather than raised one by one, so a user sees all of them (the first
`max_listed` of each kind) in one pass; the exit code is 1 if there is any.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import signal
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from cellpaint.data import metadata
from cellpaint.data.structure import derive_structure
from cellpaint.data.images import ImageError, SiteFiles, decoding_pool, png_planes, read_composite, read_png
from cellpaint.core.errors import DataError


def _check_png(path: str, planes: int = 1) -> tuple[str | None, tuple[int, int] | None]:
    """(problem or None, size or None) of one image of `planes` channels (1: a grey channel image, more:
    a composite), decoded as training would decode it."""
    try:
        return None, (read_png(path) if planes == 1 else read_composite(path, planes)[0]).shape
    except ImageError as e:
        return str(e), None


def _check_site(prefix: str, files: SiteFiles) -> list[tuple[str, str | None, tuple[int, int] | None]]:
    """(path, problem or None, size or None) of each image of a site (its channels, or its composite)."""
    planes = files.channels if files.composite else 1
    return [(path, *_check_png(path, planes)) for path in files.paths(prefix)]


def _check_file(path: str) -> list[tuple[str, str | None, tuple[int, int] | None]]:
    return [(path, *_check_png(path, png_planes(path) or 1))]


def _quiet_worker() -> None:
    """A decoding worker ends silently when the pool is closed (terminate sends it SIGTERM; the
    handler it inherits from the command would print a traceback) or when Ctrl-C reaches the group
    (the main process reports that)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _all_pngs(data_dir: Path) -> list[str]:
    """Every PNG where either layout keeps images: what is checked when the metadata cannot be read."""
    roots = [Path(data_dir) / name for name in ("train", "test", "images")]
    return sorted(str(p) for root in roots if root.is_dir() for p in root.rglob("*.png"))


def check_data(data_dir: Path, n_classes: int | None = None, images: bool = True,
               workers: int = 0) -> dict[str, list[str]]:
    """Problems found, by kind (empty dict: the data set is sound). `workers` > 1 decodes the images
    in that many processes (RxRx1 has 750,000 PNGs); the problems come out in the same order.

    A metadata problem does not stop the check: the images are still decoded (every PNG found,
    when the metadata cannot say which ones it needs), so one pass lists everything."""
    problems: dict[str, list[str]] = defaultdict(list)
    files = None
    try:
        table = metadata.load_table(data_dir)
    except DataError as e:
        problems["metadata"].append(str(e))
        table = None
    if table is not None and table.empty:
        problems["metadata"].append(f"{data_dir}: the metadata lists no wells (a file with only its header?)")
    elif table is not None:
        _check_table(table, n_classes, problems)
        try:  # how the sites are stored and their channel count, from the files
            files = metadata.site_files(data_dir, table)
        except DataError as e:
            problems["images"].append(str(e))
    if images and (files is not None or table is None and Path(data_dir).is_dir()):
        if table is not None:
            jobs, check_one = table["image_prefix"].tolist(), functools.partial(_check_site, files=files)
        else:
            jobs, check_one = _all_pngs(data_dir), _check_file
        sizes: dict[tuple[int, int], int] = defaultdict(int)
        first_of_size: dict[tuple[int, int], str] = {}
        with contextlib.ExitStack() as stack:
            sites = map(check_one, jobs)
            if workers > 1:
                pool = stack.enter_context(decoding_pool(workers, initializer=_quiet_worker))
                sites = pool.imap(check_one, jobs, chunksize=32)  # in order: a stable report
            for path, problem, size in itertools.chain.from_iterable(
                    tqdm(sites, total=len(jobs), desc="checking images", unit="site", disable=None)):
                if problem:
                    problems["images"].append(problem)
                if size:
                    sizes[size] += 1
                    first_of_size.setdefault(size, path)
        if len(sizes) > 1:
            common = max(sizes, key=sizes.get)
            for size, count in sizes.items():
                if size != common:
                    problems["images"].append(f"{count} image(s) of size {size[0]}x{size[1]} instead of "
                                              f"{common[0]}x{common[1]}, e.g. {first_of_size[size]}")
    return dict(problems)


def _check_table(table, n_classes: int | None, problems: dict[str, list[str]]) -> None:
    """Labels, id codes and the structure derived from them (what training would derive)."""
    derived = int(max(table["sirna"].max(), table["sirna_true"].max())) + 1
    try:  # classes no well has, controls that are also treatments, no labels at all
        structure = derive_structure(table, max(n_classes, derived) if n_classes else None)
        n = n_classes or structure.n_classes
    except DataError as e:
        problems["labels"].append(str(e))
        n = n_classes or derived
    bad_label = table[(table["sirna_true"] >= n) | (table["sirna_true"] < -1)]
    for row in bad_label.drop_duplicates("id_code").itertuples():
        problems["labels"].append(f"{row.id_code}: label {row.sirna_true} outside 0..{n - 1}")
    wrong_code = table["id_code"] != table["experiment"] + "_" + table["plate"].astype(str) + "_" + table["well"]
    for code in table.loc[wrong_code, "id_code"].unique():
        problems["metadata"].append(f"{code}: id_code does not match experiment_plate_well")
    for key, wells in metadata.wells_of(table).groupby(["experiment", "plate"]):
        if not (wells["well_type"] == metadata.TREATMENT).any():  # every plate of the real data holds one group
            problems["labels"].append(f"{key[0]} plate {key[1]}: no treatment wells (only controls)")
        treated = wells[(wells["well_type"] == metadata.TREATMENT) & (wells["sirna"] >= 0)]
        repeated = treated["sirna"][treated["sirna"].duplicated()].unique()
        if repeated.size:
            problems["labels"].append(f"{key[0]} plate {key[1]}: siRNA(s) {repeated[:5].tolist()} in several wells")


def report(problems: dict[str, list[str]], max_listed: int = 20, out=None) -> int:
    """Print a summary; return the exit code (0 sound, 1 problems)."""
    out = out or sys.stdout
    if not problems:
        print("data set OK", file=out)
        return 0
    for kind, items in problems.items():
        print(f"{kind}: {len(items)} problem(s)", file=out)
        for item in items[:max_listed]:
            print(f"  {item}", file=out)
        if len(items) > max_listed:
            print(f"  ... and {len(items) - max_listed} more", file=out)
    return 1
