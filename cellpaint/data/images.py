"""Reading site images (the decoded-image cache, which holds the same pixels, is
cellpaint/data/image_cache.py). A data set stores a site in one of two ways, and `SiteFiles` says
which and how many channels, as found in the data (`discover`), never assumed:

- one 8-bit grayscale PNG per channel, `{prefix}_w{c}.png` for c = 1..C (the competition and the
  RxRx1 release: C = 6);
- one 8-bit composite PNG of C colour planes, `{prefix}.png` (RxRx1-WILDS: RGB, C = 3).

The one place that decodes PNGs (the trainer, the data check, the decoded-image cache and the
picture tools all read through here), so every reader accepts and refuses the same files with the
same messages. torch is imported only when the first image is decoded, so torch-free tools stay quick.
"""
from __future__ import annotations

import functools
import glob
import multiprocessing
import os
import re
import stat
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cellpaint.core.errors import DataError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_PLANES = {0: 1, 2: 3}  # PNG colour type -> planes: grey, RGB (alpha or palettes are no cell images)
_PLANE_RE = re.compile(r"_w(\d+)\.png$")


def decoding_pool(workers: int, initializer: Callable[[], None] | None = None):
    """A process pool for decoding PNGs (the image cache's build, the data check). Its processes
    start fresh ("spawn"), not as forks: a fork of a process whose torch has run its OpenMP threads
    can hang at its first torch call (the libpng decoder is one), and a hung pool hangs its command."""
    return multiprocessing.get_context("spawn").Pool(workers, initializer=initializer)


class ImageError(DataError):
    """A site image that is missing, unreadable or not what the data set promises."""


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


def read_png_fast(path: str, planes: int = 1) -> np.ndarray | None:
    """An 8-bit, non-interlaced PNG of `planes` colour planes (1: grey, 3: RGB) decoded by libpng
    (torchvision), as [H, W] (grey) or [planes, H, W]; None for anything else.

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
    if len(header) < 29 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR" or header[24] != 8 \
            or _COLOUR_PLANES.get(header[25]) != planes or header[28] != 0:  # 8 bits, grey/RGB, not interlaced
        return None
    try:
        img = decode(data)
    except RuntimeError:
        return None
    if str(img.dtype) != "torch.uint8" or img.dim() != 3 or img.shape[0] != planes:
        return None
    return img[0].numpy() if planes == 1 else img.numpy()


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
        if isinstance(e, OSError) and e.errno is not None:  # the system refused the read (permission, I/O)
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
        raise ImageError(f"corrupt image: {path} ({e})") from None


def check_regular_file(path: str) -> None:
    """An ImageError unless `path` is a regular file: opening a FIFO would wait for a writer forever,
    and a device or a directory is no image either."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f"missing image: {path}") from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
        raise ImageError(f"{path} is not a regular file ({kind})")


def read_png(path: str) -> np.ndarray:
    """One 8-bit grayscale PNG as a [H, W] uint8 array; errors name the file."""
    check_regular_file(path)
    img = read_png_fast(path)
    return read_png_pillow(path) if img is None else img


def read_composite(path: str, channels: int) -> np.ndarray:
    """One 8-bit PNG of `channels` colour planes (3: RGB) as a [C, H, W] uint8 array; errors name the file."""
    img = read_png_fast(path, channels)
    if img is not None:
        return img
    modes = {1: "L", 3: "RGB"}
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != modes.get(channels):
                raise ImageError(f"{path}: mode {im.mode}, but the data set's composites are 8-bit with "
                                 f"{channels} channel(s) (mode {modes.get(channels, '?')})")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise ImageError(f"missing image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"corrupt image: {path} ({e})") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


@dataclass(frozen=True)
class SiteFiles:
    """How a data set stores a site: `channels` grey PNGs `{prefix}_w{c}.png` (c = 1..channels), or
    with `composite` one PNG `{prefix}.png` holding the `channels` planes. Found in the data by
    `discover`; everything that reads images (training, the check, the cache, the pixel
    statistics) takes the channel count from here. `present` False: the files are not on this
    machine (only the decoded-image cache was copied) and the cache's manifest gave the count."""
    channels: int
    composite: bool = False
    present: bool = True

    def paths(self, prefix: str) -> list[str]:
        if self.composite:
            return [f"{prefix}.png"]
        return [f"{prefix}_w{c}.png" for c in range(1, self.channels + 1)]

    def first(self, prefix: str) -> str:
        """The file whose header gives the site's image size."""
        return self.paths(prefix)[0]

    def describe(self) -> str:
        return (f"{self.channels}-channel composite PNGs ({{prefix}}.png)" if self.composite
                else f"{self.channels} grey PNGs per site ({{prefix}}_w1..{self.channels}.png)")


def _png_header(path: str, length: int) -> bytes | None:
    """The first `length` bytes of a PNG (signature, then its IHDR chunk); None where `path` is not a
    regular file, cannot be read, is shorter or is no PNG."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO: it would wait for a writer
            return None
        with open(path, "rb") as f:
            header = f.read(length)
    except OSError:
        return None
    if len(header) < length or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR":
        return None
    return header


def png_planes(path: str) -> int | None:
    """The colour planes of a PNG from its header (1 grey, 3 RGB); None if unreadable or another kind."""
    header = _png_header(path, 26)  # IHDR: width, height, bit depth, colour type (byte 25)
    return None if header is None else _COLOUR_PLANES.get(header[25])


def _plane_count(folder: str, pattern: str) -> int:
    """The largest channel number c of the `*_w{c}.png` files matching `pattern` in `folder` (0: none)."""
    names = glob.glob(os.path.join(glob.escape(folder), pattern))
    return max((int(m.group(1)) for m in map(_PLANE_RE.search, names) if m), default=0)


def discover(prefixes: Sequence[str], composite: bool | None = None, look: int = 64) -> SiteFiles:
    """How the sites of `prefixes` are stored, read off the files (the first `look` sites with any).

    Composite sites give their channel count by the PNG header; per-channel sites by the highest
    `_w{c}` number in their plate folder (a folder of many sites: one missing file does not lower
    the count). `composite` None decides by what is there. An ImageError when no site has files."""
    for prefix in list(prefixes)[:look]:
        if composite is not False and os.path.exists(f"{prefix}.png"):
            planes = png_planes(f"{prefix}.png")
            if planes is None:
                raise ImageError(f"{prefix}.png: not an 8-bit grey or RGB PNG")
            return SiteFiles(planes, composite=True)
        if composite is not True:
            channels = _plane_count(os.path.dirname(prefix) or ".", "*_w*.png") if glob.glob(
                f"{glob.escape(prefix)}_w*.png") else 0
            if channels:
                return SiteFiles(channels)
    first = prefixes[0] if len(prefixes) else "?"
    expected = {True: f"{first}.png", False: f"{first}_w1.png"}.get(composite, f"{first}.png or {first}_w1.png")
    raise ImageError(f"missing image: {expected} (no image found for the first {min(look, len(prefixes))} "
                     "site(s) of the metadata)")


def read_site(prefix: str, files: SiteFiles | int | None = None) -> np.ndarray:
    """A site as a [C, H, W] uint8 array, read as `files` says (an int: that many grey PNGs
    `{prefix}_w{c}.png`; None: as `discover` finds this site stored)."""
    if files is None:
        files = discover([prefix])
    elif isinstance(files, int):
        files = SiteFiles(files)
    if files.composite:
        return read_composite(files.first(prefix), files.channels)
    planes = [read_png(path) for path in files.paths(prefix)]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise ImageError(f"{prefix}_w*.png: channels differ in size {sorted(shapes)}")
    return np.stack(planes)


def png_size(path: str) -> tuple[int, int] | None:
    """(height, width) from a PNG's header without decoding it; None if unreadable."""
    header = _png_header(path, 24)  # IHDR: width (bytes 16-19), height (20-23)
    return None if header is None else (int.from_bytes(header[20:24], "big"), int.from_bytes(header[16:20], "big"))
