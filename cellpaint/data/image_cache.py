"""The decoded-image cache: every site decoded once into uint8 arrays, one per plate, built here
(`build_cache`, the work of `python prepare.py`) and read back site by site (`ImageCache`, what
`main.py --image-cache` reads).

Decoding the PNGs of a site (six per site in the competition layout) is nearly all the CPU work of the input pipeline; reading a decoded
site back from the page cache or a fast disk is about ten times cheaper. The cache holds, per
plate, ``{experiment}/Plate{plate}.npy`` [sites, C, H, W] uint8 (1.5 MB a site at 512 px: about
190 GB for all of RxRx1's 125,510 sites) and, written last, ``manifest.json`` (data directory,
channels, image size, site count, each plate's file and site keys) that `ImageCache` checks the
data against.

Resumable: each plate is written to a temporary file and renamed into place, then recorded in a
small ``Plate{plate}.json`` beside it; a plate whose record matches is skipped when the build is
run again, so an interrupted build loses at most the plate it was on.

Fingerprinted: each plate's record (and the manifest) keeps the fingerprint of the PNGs it was
decoded from (data/source_files.py: each file's size and modification time). `prepare.py` decodes
a plate again when its images changed (regenerated in place; a PNG recorded as bad and since
restored), and `ImageCache.open` refuses a cache whose images changed since, naming it and the plate.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellpaint.core.atomic import write_text
from cellpaint.data import images, metadata
from cellpaint.core.errors import DataError
from cellpaint.data.source_files import changed, plate_key, plate_sources

CACHE_FORMAT = "cellpaint-rcic-image-cache/2"  # /1: no fingerprint of the images (rebuilt by prepare.py)
CACHE_MANIFEST = "manifest.json"


class CacheError(DataError):
    """A decoded-image cache that is incomplete or does not belong to the data at hand."""


# ------------------------------------------------------------------------------------- reading


def plate_file(experiment: str, plate: int) -> str:
    """Path of a plate's array inside a cache, relative to the cache directory."""
    return f"{experiment}/Plate{plate}.npy"


def site_key(well: str, site: int) -> str:
    return f"{well}_s{site}"


class ImageCache:
    """Sites decoded once (prepare.py) into one uint8 array per plate, read back site by site.

    Layout of the cache directory: ``{experiment}/Plate{plate}.npy`` [sites, C, H, W] uint8, and
    ``manifest.json`` (written last) naming the data directory, channels, image size, the site
    count and, per plate, its file and the ``{well}_s{site}`` key of each row (``bad``: sites whose
    images could not be read, with the error; their rows are zero). Files are opened lazily in each
    process (each loader worker opens its own) and a site is one positioned read of its 1.5 MB: at
    512 px about 1.5x cheaper than copying it out of a fresh memory map, and no worker's memory
    grows with what it has mapped.
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.channels = int(manifest["channels"])
        self.size = (int(manifest["height"]), int(manifest["width"]))
        self.files = [p["file"] for p in manifest["plates"]]
        self._index: pd.DataFrame | None = None
        self._files: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, root: Path | str, data_dir: Path | str | None = None,
             table: pd.DataFrame | None = None, files: images.SiteFiles | None = None) -> "ImageCache":
        """The cache in `root`, checked against the data directory and its site table when given
        (and how the data stores its sites, `files`; None: as the sites' files say).

        Every mismatch is a `CacheError` with one line saying what is wrong.
        """
        root = Path(root)
        path = root / CACHE_MANIFEST
        rebuild = f"rebuild it with: python prepare.py --data DATA --cache {root}"
        if not path.is_file():
            raise CacheError(f"image cache {root}: no {CACHE_MANIFEST} (not built, or its build did not finish); "
                             + rebuild)
        try:
            manifest = json.loads(path.read_text())
        except OSError as e:
            raise CacheError(f"image cache {root}: cannot read {path}: {e.strerror or e}") from None
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(CACHE_FORMAT[:-2]):
            raise CacheError(f"image cache {root}: {path} is not a {CACHE_FORMAT} manifest")
        if manifest["format"] != CACHE_FORMAT:
            raise CacheError(f"image cache {root} was built before caches recorded the images they hold "
                             f"({manifest['format']}): {rebuild}")
        problem = _manifest_problem(manifest)
        if problem:
            raise CacheError(f"image cache {root}: {path} {problem}: {rebuild}")
        cache = cls(root, manifest)
        if data_dir is not None and Path(manifest["data"]) != Path(data_dir).resolve():
            raise CacheError(f"image cache {root} was built from {manifest['data']}, not from --data {data_dir} "
                             f"(build one for this data with prepare.py --cache NEW_DIR)")
        if table is not None:
            if len(table) != manifest["sites"]:
                raise CacheError(f"image cache {root} holds {manifest['sites']} sites but the data at "
                                 f"{manifest['data']} has {len(table)}: the data changed; rebuild it with prepare.py")
            try:  # where only the cache was copied, the PNGs are not here to compare with
                files = files or (images.discover(table["image_prefix"].to_numpy()) if len(table) else None)
            except images.ImageError:
                files = None
            if files is not None and files.present:
                if files.channels != cache.channels:
                    raise CacheError(f"image cache {root} holds {cache.channels}-channel sites but the data at "
                                     f"{manifest['data']} has {files.channels} channels: rebuild it with prepare.py")
                first = files.first(table["image_prefix"].iat[0])
                size = images.png_size(first)
                if size is not None and size != cache.size:
                    raise CacheError(f"image cache {root} holds {cache.size[0]}x{cache.size[1]} images but "
                                     f"{first} is {size[0]}x{size[1]}: rebuild it with prepare.py")
            recorded = {plate_key(p["experiment"], p["plate"]): p.get("sources") for p in manifest["plates"]}
            stale = changed(recorded, plate_sources(table, files)) if files is not None and files.present else []
            if stale:
                raise CacheError(f"image cache {root} is stale: the images of {len(stale)} plate(s) changed since "
                                 f"it was built (e.g. {stale[0]}); {rebuild}")
        return cache

    def index(self) -> pd.DataFrame:
        """One row per cached site: experiment, plate, well, site, file (index into `files`), row, bad."""
        if self._index is None:
            parts = []
            for file_id, p in enumerate(self.manifest["plates"]):
                keys = pd.Series(p["sites"], dtype=object)
                well_site = keys.str.rsplit("_s", n=1, expand=True)
                parts.append(pd.DataFrame({
                    "experiment": str(p["experiment"]), "plate": int(p["plate"]),
                    "well": well_site[0].astype(str), "site": well_site[1].astype(np.int64),
                    "file": file_id, "row": np.arange(len(keys)),
                    "bad": keys.map(p.get("bad", {})).astype(object),
                }))
            columns = ["experiment", "plate", "well", "site", "file", "row", "bad"]
            self._index = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
        return self._index

    def locate(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file index, row, error message or None) of each of `rows`; a CacheError if one is missing."""
        keys = ["experiment", "plate", "well", "site"]
        wanted = rows[keys].astype({"experiment": str, "plate": np.int64, "well": str, "site": np.int64})
        found = wanted.merge(self.index(), on=keys, how="left", validate="many_to_one")
        missing = found["file"].isna().to_numpy()
        if missing.any():
            e = found[missing].iloc[0]
            raise CacheError(f"image cache {self.root} lacks {int(missing.sum())} site(s) of the table, e.g. "
                             f"{e['experiment']} plate {e['plate']} well {e['well']} site {e['site']}: "
                             f"rebuild it with prepare.py")
        bad = found["bad"].where(found["bad"].notna(), None).to_numpy(dtype=object)
        return found["file"].to_numpy(np.int64), found["row"].to_numpy(np.int64), bad

    def _file(self, file_id: int) -> tuple[int, int, tuple[int, ...]]:
        """(descriptor, data offset, site shape) of a plate's array, opened on first use in this process."""
        if self._pid != os.getpid():  # a forked loader worker opens the files itself
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(file_id)
        if f is None:
            path = self.root / self.files[file_id]
            try:
                header = np.load(path, mmap_mode="r")  # reads and checks the .npy header only
            except (OSError, ValueError) as e:
                raise CacheError(f"image cache {self.root}: cannot read {path} ({e}): rebuild it with prepare.py") from None
            if header.dtype != np.uint8 or header.ndim != 4 or not header.flags.c_contiguous:
                raise CacheError(f"image cache {self.root}: {path} is not a [sites, C, H, W] uint8 array")
            f = self._files[file_id] = (os.open(path, os.O_RDONLY), header.offset, header.shape[1:])
            del header
        return f

    def read(self, file_id: int, row: int) -> np.ndarray:
        """One cached site, [C, H, W] uint8 (one positioned read: no mapping, nothing kept)."""
        fd, offset, shape = self._file(file_id)
        out = np.empty(shape, dtype=np.uint8)
        if os.preadv(fd, [out], offset + row * out.nbytes) != out.nbytes:
            raise CacheError(f"image cache {self.root}: {self.files[file_id]} is truncated: rebuild it with prepare.py")
        return out

    def close(self) -> None:
        """Close the files this process opened (reading again reopens them)."""
        if self._pid == os.getpid():
            for fd, *_ in self._files.values():
                os.close(fd)
        self._files = {}

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}  # descriptors are per process
        return state


def _manifest_problem(manifest: dict) -> str | None:
    """What a manifest lacks for `ImageCache` to read it (an edited or truncated file), None if nothing."""
    for key, kind in (("data", str), ("channels", int), ("height", int), ("width", int), ("sites", int),
                      ("plates", list)):
        if not isinstance(manifest.get(key), kind):
            return f"has no {key!r} ({kind.__name__})"
    for i, plate in enumerate(manifest["plates"]):
        if not (isinstance(plate, dict) and isinstance(plate.get("file"), str) and isinstance(plate.get("sites"), list)
                and isinstance(plate.get("experiment"), str) and isinstance(plate.get("plate"), int)):
            return f"has a malformed entry {i} in 'plates'"
    return None


# ------------------------------------------------------------------------------------ building


def _decode(job: tuple[str, images.SiteFiles]) -> tuple[np.ndarray | None, str | None]:
    prefix, files = job
    try:
        return images.read_site(prefix, files), None
    except images.ImageError as e:
        return None, str(e)


def _record_path(cache_dir: Path, file: str) -> Path:
    return cache_dir / Path(file).with_suffix(".json")


def _plate_done(cache_dir: Path, entry: dict, data: str, channels: int) -> dict | None:
    """The plate's record if its array is complete and matches `entry` (its images unchanged), else None."""
    try:
        record = json.loads(_record_path(cache_dir, entry["file"]).read_text())
        ok = (record.get("data") == data and record.get("channels") == channels
              and record.get("sites") == entry["sites"] and record.get("sources") == entry["sources"])
        if ok:
            shape = np.load(cache_dir / entry["file"], mmap_mode="r").shape
            ok = shape == (len(entry["sites"]), channels, record["height"], record["width"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def _plates(table: pd.DataFrame, files: images.SiteFiles) -> list[tuple[dict, list[str]]]:
    """(manifest entry, image prefixes) per plate, in table order, sites sorted by well and site."""
    out = []
    sources = plate_sources(table, files)
    for (experiment, plate), rows in table.groupby(["experiment", "plate"], sort=False):
        rows = rows.sort_values(["well", "site"], kind="stable")
        entry = {"split": str(rows["split"].iat[0]), "experiment": str(experiment), "plate": int(plate),
                 "file": plate_file(str(experiment), int(plate)),
                 "sites": [site_key(w, int(s)) for w, s in zip(rows["well"], rows["site"])],
                 "sources": sources[plate_key(str(experiment), int(plate))].digest}
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
                skip_bad_images: bool = False, progress: bool = True) -> dict:
    """Build (or complete) the image cache of `data_dir` in `cache_dir`; returns a summary."""
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    table = metadata.load_table(data_dir) if table is None else table
    files = images.discover(table["image_prefix"].to_numpy())  # how the sites are stored, their channel count
    channels = files.channels
    data = str(data_dir.resolve())
    manifest_path = cache_dir / CACHE_MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text()).get("data")
        except (ValueError, AttributeError):
            old = None
        if old is not None and old != data:
            raise CacheError(f"{cache_dir} holds the image cache of {old}, not of {data}: "
                                     f"choose another --cache directory")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("*/.*.tmp"):  # left by an interrupted run
        stale.unlink()

    plates = _plates(table, files)
    records = [_plate_done(cache_dir, entry, data, channels) for entry, _ in plates]
    sizes = {(r["height"], r["width"]) for r in records if r}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    if len(sizes) > 1:  # complete plates of different sizes: the data changed under the cache
        records = [None] * len(plates)
    todo = [i for i, r in enumerate(records) if r is None]
    summary = {"plates": len(plates), "plates_decoded": len(todo), "sites": len(table),
               "sites_decoded": sum(len(plates[i][0]["sites"]) for i in todo), "bad": 0,
               # decoded before, but not from these images (or sites): changed since, or a bad site restored
               "stale": sum(_record_path(cache_dir, plates[i][0]["file"]).exists() for i in todo)}
    if not todo and manifest_path.is_file():
        try:
            ImageCache.open(cache_dir, data_dir, table, files)
            return summary
        except CacheError:
            pass  # complete plates but a stale manifest: write it again below
    if manifest_path.exists():
        manifest_path.unlink()  # the cache is incomplete until the new manifest is written

    started = time.time()
    bar = tqdm(total=len(table), initial=len(table) - summary["sites_decoded"], unit="site",
               desc=f"decoding into {cache_dir}", disable=not progress, smoothing=0.05)
    pool = images.decoding_pool(workers) if workers > 1 and todo else None
    try:
        for i in todo:
            entry, prefixes = plates[i]
            jobs = [(p, files) for p in prefixes]
            results = pool.imap(_decode, jobs, chunksize=2) if pool else map(_decode, jobs)
            bar.set_postfix_str(f"{entry['experiment']} plate {entry['plate']}")
            size, bad = _write_plate(cache_dir, entry, results, size, channels, skip_bad_images, bar)
            records[i] = {"data": data, "channels": channels, "height": int(size[0]), "width": int(size[1]),
                          "sites": entry["sites"], "sources": entry["sources"], "bad": bad}
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
    manifest = {"format": CACHE_FORMAT, "data": data, "channels": channels, "height": height,
                "width": width, "sites": len(table), "plates": [entry for entry, _ in plates]}
    write_text(manifest_path, json.dumps(manifest))
    summary["seconds"] = time.time() - started
    return summary
