"""Reading site images: one 8-bit grayscale PNG per channel, `{prefix}_w{c}.png` for c = 1..6 (the
decoded-image cache, which holds the same pixels, is cellpaint/data/image_cache.py).

The one place that decodes PNGs (the trainer, the data check, the decoded-image cache and the
picture tools all read through here), so every reader accepts and refuses the same files with the
same messages. torch is imported only when the first image is decoded, so torch-free tools stay quick.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import stat
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from cellpaint.core.errors import DataError

CHANNELS = 6
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decoding_pool(workers: int):
    """A process pool for decoding PNGs (the image cache's build, the data check). Its processes
    start fresh ("spawn"), not as forks: a fork of a process whose torch has run its OpenMP threads
    can hang at its first torch call (the libpng decoder is one), and a hung pool hangs its command."""
    return multiprocessing.get_context("spawn").Pool(workers)


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
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO: it would wait for a writer
            return None
        with open(path, "rb") as f:
            header = f.read(24)
    except OSError:
        return None
    if len(header) < 24 or header[:8] != _PNG_SIGNATURE or header[12:16] != b"IHDR":
        return None
    return int.from_bytes(header[20:24], "big"), int.from_bytes(header[16:20], "big")
