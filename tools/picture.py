"""Pictures of sites: the six channels tinted and added into one RGB image, their legend, and PNG
output (tools/show.py chooses what to draw). Pillow and numpy only: no torch import."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cellpaint.core.atomic import atomic_write

TILE_TARGET = 128            # px: small sites are enlarged (nearest neighbour) to at least this
LOW_PERCENTILE = 1.0         # black point of each channel
HIGH_PERCENTILE = 99.5       # white point of each channel
MIN_SPAN = 8.0               # grey levels: a channel that varies less is shown dim, not blown up into noise
BACKGROUND = (18, 18, 18)
TEXT = (235, 235, 235)
DIM = (150, 150, 150)


@dataclass(frozen=True)
class Stain:
    channel: int
    name: str
    target: str
    rgb: tuple[int, int, int]


STAINS = (
    Stain(1, "Hoechst", "nuclei", (19, 0, 249)),            # blue
    Stain(2, "ConA", "ER", (42, 255, 31)),                  # green
    Stain(3, "phalloidin", "actin", (255, 0, 25)),          # red
    Stain(4, "SYTO14", "nucleoli/RNA", (45, 255, 252)),     # cyan
    Stain(5, "MitoTracker", "mitochondria", (250, 0, 253)),  # magenta
    Stain(6, "WGA", "Golgi/membrane", (254, 255, 40)),      # yellow
)
COLOURS = np.array([s.rgb for s in STAINS], dtype=np.float32) / 255.0  # [channels, 3]


# --------------------------------------------------------------------------------------------- pixels


def channel_limits(sites: np.ndarray | Sequence[np.ndarray], low: float = LOW_PERCENTILE,
                   high: float = HIGH_PERCENTILE) -> np.ndarray:
    """[C, 2] black and white points per channel: percentiles over all pixels of one [C, H, W] site or of several.

    A channel whose high percentile does not rise above the low one (a sparse signal) takes its maximum as the
    white point. `composite` never stretches less than MIN_SPAN grey levels to full brightness.
    """
    sites = [sites] if isinstance(sites, np.ndarray) and sites.ndim == 3 else list(sites)
    pixels = np.concatenate([np.asarray(s).reshape(s.shape[0], -1) for s in sites], axis=1)
    limits = np.percentile(pixels, [low, high], axis=1).T.astype(np.float32)
    sparse = limits[:, 1] <= limits[:, 0]
    limits[sparse, 1] = pixels[sparse].max(axis=1)
    return limits


def composite(site: np.ndarray, limits: np.ndarray | None = None, low: float = LOW_PERCENTILE,
              high: float = HIGH_PERCENTILE) -> np.ndarray:
    """[6, H, W] uint8 site -> [H, W, 3] uint8 RGB: per-channel stretch, tint, additive blend, clip."""
    site = np.asarray(site)
    if site.ndim != 3 or site.shape[0] != len(STAINS):
        raise ValueError(f"expected a [{len(STAINS)}, H, W] site, got shape {site.shape}")
    if limits is None:
        limits = channel_limits(site, low, high)
    lo = limits[:, 0, None, None]
    span = np.maximum(limits[:, 1, None, None] - lo, MIN_SPAN)  # a flat channel renders black
    scaled = np.clip((site.astype(np.float32) - lo) / span, 0.0, 1.0)
    rgb = np.einsum("chw,ck->hwk", scaled, COLOURS)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def default_scale(height: int, width: int) -> int:
    """Enough whole-number enlargement to bring a small site to ~TILE_TARGET px; 1 for sites that large already."""
    side = max(height, width)
    return max(1, math.ceil(TILE_TARGET / side)) if side < TILE_TARGET else 1


def resize(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """RGB array -> PIL image of `size` (w, h): nearest neighbour when enlarging (pixels stay crisp), box when reducing."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if img.size == tuple(size):
        return img
    up = size[0] >= img.width and size[1] >= img.height
    return img.resize(size, Image.Resampling.NEAREST if up else Image.Resampling.BOX)


def scaled_size(height: int, width: int, scale: float | None) -> tuple[int, int]:
    s = default_scale(height, width) if scale is None else scale
    return max(1, round(width * s)), max(1, round(height * s))


def save_png(img: Image.Image, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")


# ---------------------------------------------------------------------------------------------- text


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` px (the fixed bitmap font on a Pillow without FreeType or < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default()


def _line_height(f) -> int:
    box = f.getbbox("Ag|")
    return box[3] - min(box[1], 0) + 3


def _fit(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    """`text`, shortened with '..' if it is wider than `width` px."""
    if draw.textlength(text, font=f) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "..", font=f) > width:
        text = text[:-1]
    return text + ".."


def _fitting_size(texts: Sequence[str], width: int, largest: int, smallest: int = 8) -> int:
    """The largest font size (down to `smallest`) at which every text fits in `width` px."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for size in range(largest, smallest, -1):
        f = font(size)
        if all(probe.textlength(t, font=f) <= width for t in texts):
            return size
    return smallest


def _wrap(draw: ImageDraw.ImageDraw, text: str, f, width: int, sep: str = ", ") -> list[str]:
    """`text` broken at `sep` into lines that fit `width` px (a part too long for any line is cut short)."""
    lines: list[str] = []
    for part in text.split(sep):
        joined = f"{lines[-1]}{sep}{part}" if lines else part
        if lines and draw.textlength(joined, font=f) <= width:
            lines[-1] = joined
        else:
            if lines:
                lines[-1] += sep.rstrip()
            lines.append(_fit(draw, part, f, width))
    return lines


def legend(width: int, size: int) -> Image.Image:
    """A strip naming the channels, each after a swatch of its colour, flowed into lines `width` px wide."""
    f = font(size)
    lh = _line_height(f)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(f"w{s.channel} {s.name} ({s.target})", s.rgb) for s in STAINS]  # as with_legend measures them
    gap, sw = size, size - 2
    lines: list[list[tuple[str, tuple]]] = [[]]
    x = 0
    for text, rgb in items:
        w = sw + 4 + int(probe.textlength(text, font=f))
        if lines[-1] and x + w > width:
            lines.append([])
            x = 0
        lines[-1].append((text, rgb))
        x += w + gap
    img = Image.new("RGB", (width, lh * len(lines) + 2), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for row, line in enumerate(lines):
        x, y = 0, row * lh + 1
        for text, rgb in line:
            draw.rectangle([x, y + 2, x + sw - 1, y + 1 + sw], fill=rgb)
            draw.text((x + sw + 4, y), _fit(draw, text, f, width - x - sw - 4), fill=TEXT, font=f)
            x += sw + 4 + int(draw.textlength(text, font=f)) + gap
    return img


def with_legend(img: Image.Image) -> Image.Image:
    texts = [f"w{s.channel} {s.name} ({s.target})" for s in STAINS]
    strip = legend(img.width, _fitting_size(texts, img.width - 16, 14))
    out = Image.new("RGB", (img.width, img.height + strip.height), BACKGROUND)
    out.paste(img, (0, 0))
    out.paste(strip, (0, img.height))
    return out
