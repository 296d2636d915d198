"""Reading site images: one 8-bit grayscale PNG per channel, `{prefix}_w{c}.png` for c = 1..6, or
the same pixels from the decoded-image cache that prepare.py writes (`ImageCache`).

The one place that decodes PNGs (the trainer, the data check, the decoded-image cache and the
picture tools all read through here), so every reader accepts and refuses the same files with the
same messages. torch is imported only when the first image is decoded, so torch-free tools stay quick.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cellpaint.data.metadata import DataError

CHANNELS = 6
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CACHE_FORMAT = "cellpaint-rcic-image-cache/1"
CACHE_MANIFEST = "manifest.json"


class ImageError(DataError):
    """A site image that is missing, unreadable or not what the data set promises."""


class CacheError(DataError):
    """A decoded-image cache that is incomplete or does not belong to the data at hand."""


@functools.lru_cache(maxsize=None)
def libpng_decoder() -> Callable | None:
    """torchvision's libpng decoding op, called directly: its Python wrapper warns on every call that
    torchvision's image I/O is deprecated (from 0.29). None where it is gone: Pillow does it all then."""
    try:
        import torch
        from torchvision.io.image import ImageReadMode, _has_image_ops
        op = torch.ops.image.decode_png if _has_image_ops() else None
        return None if op is None else (lambda data: op(torch.from_numpy(data), ImageReadMode.UNCHANGED.value, False))
    except Exception:  # noqa: BLE001 - any failure only means the fast path is unavailable
        return None


def read_png_fast(path: str) -> np.ndarray | None:
    """An 8-bit grayscale, non-interlaced PNG decoded by libpng (torchvision); None for anything else.

    5-10% faster than Pillow here, and decoding is nearly all of the loader's work. Whatever this path
    does not handle plainly (other modes, interlacing, transparency, damaged files) is left to
    Pillow, which decides and reports exactly as before.
    """
    decode = libpng_decoder()
    if decode is None:
        return None
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    header = data[:29].tobytes()
    if len(header) < 29 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR" \
            or header[24] != 8 or header[25] != 0 or header[28] != 0:  # bit depth 8, grey, not interlaced
        return None
    try:
        img = decode(data)
    except RuntimeError:
        return None
    if str(img.dtype) != "torch.uint8" or img.dim() != 3 or img.shape[0] != 1:
        return None
    return img[0].numpy()


def read_png_pillow(path: str) -> np.ndarray:
    """The reference decoder: it decides what is corrupt or of the wrong mode, in the messages users see."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            if img.mode != "L":
                raise ImageError(f"{path}: not 8-bit single-channel (mode {img.mode})")
            return np.asarray(img)
    except FileNotFoundError:
        raise ImageError(f"missing image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"corrupt image: {path} ({e})") from None


def read_png(path: str) -> np.ndarray:
    """One 8-bit grayscale PNG as a [H, W] uint8 array; errors name the file."""
    img = read_png_fast(path)
    return read_png_pillow(path) if img is None else img


def read_site(prefix: str, channels: int = CHANNELS) -> np.ndarray:
    """The `channels` PNGs `{prefix}_w{c}.png` stacked into a [C, H, W] uint8 array."""
    planes = [read_png(f"{prefix}_w{c}.png") for c in range(1, channels + 1)]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise ImageError(f"{prefix}_w*.png: channels differ in size {sorted(shapes)}")
    return np.stack(planes)


def png_size(path: str) -> tuple[int, int] | None:
    """(height, width) from a PNG's header without decoding it; None if unreadable."""
    try:
        with open(path, "rb") as f:
            header = f.read(24)
    except OSError:
        return None
    if len(header) < 24 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR":
        return None
    return int.from_bytes(header[20:24], "big"), int.from_bytes(header[16:20], "big")


# ---------------------------------------------------------------------------- decoded-image cache


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
             table: pd.DataFrame | None = None) -> "ImageCache":
        """The cache in `root`, checked against the data directory and its site table when given.

        Every mismatch is a `CacheError` with one line saying what is wrong.
        """
        root = Path(root)
        path = root / CACHE_MANIFEST
        if not path.is_file():
            raise CacheError(f"image cache {root}: no {CACHE_MANIFEST} (not built, or its build did not finish); "
                             f"build it with: python prepare.py --data DATA --cache {root}")
        try:
            manifest = json.loads(path.read_text())
            ok = manifest.get("format") == CACHE_FORMAT
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise CacheError(f"image cache {root}: {path} is not a {CACHE_FORMAT} manifest")
        cache = cls(root, manifest)
        if data_dir is not None and Path(manifest["data"]) != Path(data_dir).resolve():
            raise CacheError(f"image cache {root} was built from {manifest['data']}, not from --data {data_dir} "
                             f"(build one for this data with prepare.py --cache NEW_DIR)")
        if table is not None:
            if len(table) != manifest["sites"]:
                raise CacheError(f"image cache {root} holds {manifest['sites']} sites but the data at "
                                 f"{manifest['data']} has {len(table)}: the data changed; rebuild it with prepare.py")
            if len(table):
                first = f"{table['image_prefix'].iat[0]}_w1.png"
                size = png_size(first)
                if size is not None and size != cache.size:
                    raise CacheError(f"image cache {root} holds {cache.size[0]}x{cache.size[1]} images but "
                                     f"{first} is {size[0]}x{size[1]}: rebuild it with prepare.py")
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
