#!/usr/bin/env python3
"""Decode every site once into uint8 arrays, one per plate: the loader's image cache.

    python prepare.py --data DIR --cache CACHE_DIR [--workers N] [--skip-bad-images]
    python main.py --image-cache CACHE_DIR ...        (train / val / predict then read the cache)

Decoding the 6 PNGs of a site is nearly all the CPU work of the input pipeline; reading a decoded
site back from the page cache or a fast disk is about ten times cheaper. The cache holds, per
plate, ``{experiment}/Plate{plate}.npy`` [sites, C, H, W] uint8 (1.5 MB a site at 512 px: about
190 GB for all of RxRx1's 125,510 sites) and, written last, ``manifest.json`` (data directory,
channels, image size, site count, each plate's file and site keys) that `images.ImageCache`
checks the data against.

Resumable: each plate is written to a temporary file and renamed into place, then recorded in a
small ``Plate{plate}.json`` beside it; a plate whose record matches is skipped when the command
is run again, so an interrupted build loses at most the plate it was on.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellpaint.data import images
from cellpaint.data import metadata
from cellpaint.atomic import write_text


def _decode(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    prefix, channels = job
    try:
        return images.read_site(prefix, channels), None
    except images.ImageError as e:
        return None, str(e)


def _record_path(cache_dir: Path, file: str) -> Path:
    return cache_dir / Path(file).with_suffix(".json")


def _plate_done(cache_dir: Path, entry: dict, data: str, channels: int) -> dict | None:
    """The plate's record if its array is complete and matches `entry`, else None."""
    try:
        record = json.loads(_record_path(cache_dir, entry["file"]).read_text())
        ok = (record.get("data") == data and record.get("channels") == channels
              and record.get("sites") == entry["sites"])
        if ok:
            shape = np.load(cache_dir / entry["file"], mmap_mode="r").shape
            ok = shape == (len(entry["sites"]), channels, record["height"], record["width"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def _plates(table: pd.DataFrame) -> list[tuple[dict, list[str]]]:
    """(manifest entry, image prefixes) per plate, in table order, sites sorted by well and site."""
    out = []
    for (experiment, plate), rows in table.groupby(["experiment", "plate"], sort=False):
        rows = rows.sort_values(["well", "site"], kind="stable")
        entry = {"split": str(rows["split"].iat[0]), "experiment": str(experiment), "plate": int(plate),
                 "file": images.plate_file(str(experiment), int(plate)),
                 "sites": [images.site_key(w, int(s)) for w, s in zip(rows["well"], rows["site"])]}
        out.append((entry, rows["image_prefix"].tolist()))
    return out


def _write_plate(cache_dir: Path, entry: dict, results, size: tuple[int, int] | None, channels: int,
                 skip_bad_images: bool, bar: tqdm) -> tuple[tuple[int, int], dict[str, str]]:
    """Write one plate's array (temporary file, then rename); returns (image size, bad sites)."""
    final = cache_dir / entry["file"]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    array = None
    bad: dict[str, str] = {}
    try:
        for row, (key, (img, error)) in enumerate(zip(entry["sites"], results)):
            bar.update(1)
            if img is not None and size is not None and img.shape[1:] != size:
                error = (f"{entry['experiment']} plate {entry['plate']} {key}: {img.shape[1]}x{img.shape[2]} "
                         f"images, the others are {size[0]}x{size[1]}")
            if error is not None:
                if not skip_bad_images:
                    raise images.ImageError(error)
                tqdm.write(f"warning: skipping site: {error}", file=sys.stderr)
                bad[key] = error
                continue
            if array is None:
                size = size or img.shape[1:]
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                  shape=(len(entry["sites"]), channels, *size))
            array[row] = img
        if array is None:
            raise images.ImageError(f"{entry['experiment']} plate {entry['plate']}: no readable site")
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return size, bad


def build_cache(data_dir: Path, cache_dir: Path, table: pd.DataFrame | None = None, workers: int = 1,
                skip_bad_images: bool = False, progress: bool = True, channels: int = images.CHANNELS) -> dict:
    """Build (or complete) the image cache of `data_dir` in `cache_dir`; returns a summary."""
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    table = metadata.load_table(data_dir) if table is None else table
    data = str(data_dir.resolve())
    manifest_path = cache_dir / images.CACHE_MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text()).get("data")
        except (ValueError, AttributeError):
            old = None
        if old is not None and old != data:
            raise images.CacheError(f"{cache_dir} holds the image cache of {old}, not of {data}: "
                                     f"choose another --cache directory")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("*/.*.tmp"):  # left by an interrupted run
        stale.unlink()

    plates = _plates(table)
    records = [_plate_done(cache_dir, entry, data, channels) for entry, _ in plates]
    sizes = {(r["height"], r["width"]) for r in records if r}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    if len(sizes) > 1:  # complete plates of different sizes: the data changed under the cache
        records = [None] * len(plates)
    todo = [i for i, r in enumerate(records) if r is None]
    summary = {"plates": len(plates), "plates_decoded": len(todo), "sites": len(table),
               "sites_decoded": sum(len(plates[i][0]["sites"]) for i in todo), "bad": 0}
    if not todo and manifest_path.is_file():
        try:
            images.ImageCache.open(cache_dir, data_dir, table)
            return summary
        except images.CacheError:
            pass  # complete plates but a stale manifest: write it again below
    if manifest_path.exists():
        manifest_path.unlink()  # the cache is incomplete until the new manifest is written

    started = time.time()
    bar = tqdm(total=len(table), initial=len(table) - summary["sites_decoded"], unit="site",
               desc=f"decoding into {cache_dir}", disable=not progress, smoothing=0.05)
    pool = multiprocessing.Pool(workers) if workers > 1 and todo else None
    try:
        for i in todo:
            entry, prefixes = plates[i]
            jobs = [(p, channels) for p in prefixes]
            results = pool.imap(_decode, jobs, chunksize=2) if pool else map(_decode, jobs)
            bar.set_postfix_str(f"{entry['experiment']} plate {entry['plate']}")
            size, bad = _write_plate(cache_dir, entry, results, size, channels, skip_bad_images, bar)
            records[i] = {"data": data, "channels": channels, "height": int(size[0]), "width": int(size[1]),
                          "sites": entry["sites"], "bad": bad}
            write_text(_record_path(cache_dir, entry["file"]), json.dumps(records[i]))
    except BaseException:
        if pool:  # do not wait for the decoding still queued
            pool.terminate()
            pool.join()
            pool = None
        raise
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()

    for (entry, _), record in zip(plates, records):
        entry["bad"] = record.get("bad", {})
        summary["bad"] += len(entry["bad"])
    height, width = (int(v) for v in size)
    manifest = {"format": images.CACHE_FORMAT, "data": data, "channels": channels, "height": height,
                "width": width, "sites": len(table), "plates": [entry for entry, _ in plates]}
    write_text(manifest_path, json.dumps(manifest))
    summary["seconds"] = time.time() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../data"), help="data set (either layout)")
    p.add_argument("--cache", type=Path, required=True, help="cache directory (created; resumed if it exists)")
    p.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="record sites with missing/corrupt images as bad instead of stopping")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        s = build_cache(args.data, args.cache, workers=max(1, args.workers),
                        skip_bad_images=args.skip_bad_images, progress=not args.quiet)
    except metadata.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not s["plates_decoded"]:
        print(f"{args.cache}: complete ({s['sites']} sites in {s['plates']} plates), nothing to do")
    else:
        print(f"{args.cache}: decoded {s['sites_decoded']} sites in {s['plates_decoded']} plates "
              f"({s['plates'] - s['plates_decoded']} were already complete) in {s['seconds']:.0f}s"
              + (f"; {s['bad']} bad site(s) recorded" if s["bad"] else ""))
    print(f"use it with: python main.py --data {args.data} --image-cache {args.cache} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
