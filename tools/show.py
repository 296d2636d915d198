"""Look at the data: a site's six channels as one RGB picture, and contact sheets of classes.

    python -m tools.show --data DIR [--id-code ID] [--site 1] [--out site.png]
    python -m tools.show --data DIR --contact-sheet sheet.png [--classes 8 | --class-ids 3,7,12] [--wells 6]

Colours follow the usual RxRx1 map (the values of rxrx1-utils): w1 Hoechst (nuclei) blue, w2 ConA (ER) green,
w3 phalloidin (actin) red, w4 SYTO14 (nucleoli/RNA) cyan, w5 MitoTracker (mitochondria) magenta, w6 WGA
(Golgi/membrane) yellow. Each channel is stretched between a low and a high percentile of its pixels (per
site, or over the whole sheet with --stretch sheet), clipped to [0, 1], tinted, and the six are added and
clipped: where every stain is bright the picture turns white.

Pillow and numpy only: no matplotlib, and no torch import (the viewer starts at once; the PNGs are decoded
here exactly as images.read_site decodes them).
"""
from __future__ import annotations

import argparse
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

if __package__ in (None, ""):  # run as a script (python tools/show.py): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellpaint.data import metadata  # noqa: E402
from cellpaint.atomic import atomic_write  # noqa: E402
from cellpaint.data.images import read_site  # noqa: E402,F401 - show.read_site is part of this tool's API
from cellpaint.data.metadata import DataError  # noqa: E402
from cellpaint.errors import exit_status  # noqa: E402

PROG = "python -m tools.show"
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


class ShowError(DataError):
    """A request this tool cannot satisfy (unknown id_code, unlabelled class, ...): one line for the user."""


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


# ------------------------------------------------------------------------------------------- choosing


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _summary(values: Sequence[int]) -> str:
    values = sorted(values)
    if len(values) <= 12:
        return ", ".join(map(str, values))
    return f"{values[0]}..{values[-1]}, {len(values)} in all"


def find_site(table: pd.DataFrame, id_code: str | None, site: int) -> pd.Series:
    """The row of `id_code` at `site`; without an id_code, the first train site."""
    if id_code is None:
        rows = table[(table["split"] == "train") & (table["site"] == site)]
        if rows.empty:
            raise ShowError(f"no train site {site} in the data (sites: {_summary(table['site'].unique())})")
        return rows.iloc[0]
    rows = table[table["id_code"] == id_code]
    if rows.empty:
        raise ShowError(f"unknown id_code {id_code!r}{_suggest(table, id_code)}")
    at = rows[rows["site"] == site]
    if at.empty:
        raise ShowError(f"{id_code} has no site {site} (sites: {_summary(rows['site'].unique())})")
    return at.iloc[0]


def _suggest(table: pd.DataFrame, id_code: str) -> str:
    experiment = id_code.split("_")[0]
    experiments = table["experiment"].unique().tolist()
    if experiment in experiments:
        pool = table.loc[table["experiment"] == experiment, "id_code"].unique().tolist()
        close = difflib.get_close_matches(id_code, pool, n=3)
        return f" (did you mean {', '.join(close)}?)" if close else f" (e.g. {pool[0]})"
    close = difflib.get_close_matches(experiment, experiments, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"experiments: {_summary_names(experiments)}"
    return f": no experiment {experiment!r} ({hint})"


def _summary_names(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names) if len(names) <= 8 else f"{', '.join(names[:4])}, ... {names[-1]} ({len(names)} in all)"


def labelled(table: pd.DataFrame, site: int) -> pd.DataFrame:
    """Rows of `site` whose label training may use (sirna >= 0: train wells, controls, layout-leaked wells)."""
    return table[(table["sirna"] >= 0) & (table["site"] == site)]


def choose_classes(table: pd.DataFrame, site: int, n: int, class_ids: Sequence[int] | None) -> list[int]:
    """`class_ids` checked against the labelled classes, or the first `n` labelled classes."""
    if not (table["site"] == site).any():
        raise ShowError(f"no site {site} in the data (sites: {_summary(table['site'].unique())})")
    available = sorted(int(c) for c in labelled(table, site)["sirna"].unique())
    if not available:
        raise ShowError(f"no labelled wells at site {site}")
    if class_ids is None:
        return available[:n]
    missing = [c for c in class_ids if c not in set(available)]
    if missing:
        raise ShowError(f"class {missing[0]} has no labelled wells (labelled classes: {_summary(available)})")
    return list(class_ids)


def choose_wells(table: pd.DataFrame, site: int, class_id: int, k: int) -> pd.DataFrame:
    """Up to `k` wells of a class, spread evenly over the table order (so over experiments and cell types)."""
    rows = labelled(table, site)
    rows = rows[rows["sirna"] == class_id]
    if len(rows) <= k:
        return rows
    return rows.iloc[np.unique(np.linspace(0, len(rows) - 1, k).round().astype(int))]


# --------------------------------------------------------------------------------------------- sheet


@dataclass
class Sheet:
    image: Image.Image
    boxes: list[list[tuple[int, int, int, int] | None]]   # [class][well] tile box (x0, y0, x1, y1); None: no well
    id_codes: list[list[str]] = field(default_factory=list)


def _well_kind(row) -> str:
    return {"positive_control": " +ctrl", "negative_control": " -ctrl"}.get(row.well_type, "")


def contact_sheet(table: pd.DataFrame, class_ids: Sequence[int], wells: int, site: int = 1,
                  scale: float | None = None, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE,
                  stretch: str = "site", title: str = "") -> Sheet:
    """One row per class, `wells` composites of that class each, captioned with class id and id_code."""
    chosen = [choose_wells(table, site, c, wells) for c in class_ids]
    sites = [[read_site(r.image_prefix) for r in rows.itertuples()] for rows in chosen]
    first = next((s for row in sites for s in row), None)
    if first is None:
        raise ShowError("none of the chosen classes has a well to show")
    limits = channel_limits([s for row in sites for s in row], low, high) if stretch == "sheet" else None
    tile_w, tile_h = scaled_size(first.shape[1], first.shape[2], scale)

    pad, gap = 8, 6
    width = 2 * pad + wells * tile_w + (wells - 1) * gap
    captions = [f"class {c}{_well_kind(r)}" for c, rows in zip(class_ids, chosen) for r in rows.itertuples()]
    captions += [r.id_code for rows in chosen for r in rows.itertuples()]
    fs = max(10, min(15, tile_w // 10))
    f = font(_fitting_size(captions, tile_w, fs))  # shrink (to 8 px) rather than cut id_codes short
    f_title = font(fs + 2)
    lh = _line_height(f)
    caption = 2 * lh + 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head = _wrap(probe, title, f_title, width - 2 * pad) if title else []
    head_h = len(head) * _line_height(f_title)
    key = legend(width - 2 * pad, fs)
    top = pad + head_h + key.height + gap
    height = top + len(class_ids) * (tile_h + caption) + (len(class_ids) - 1) * gap + pad

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(head):
        draw.text((pad, pad + i * _line_height(f_title)), _fit(draw, line, f_title, width - 2 * pad),
                  fill=TEXT, font=f_title)
    img.paste(key, (pad, pad + head_h))

    boxes: list[list] = []
    codes: list[list[str]] = []
    for r, (class_id, rows, row_sites) in enumerate(zip(class_ids, chosen, sites)):
        y = top + r * (tile_h + caption + gap)
        boxes.append([])
        codes.append([])
        records = list(rows.itertuples())
        for c in range(wells):
            x = pad + c * (tile_w + gap)
            if c >= len(records):
                draw.rectangle([x, y, x + tile_w - 1, y + tile_h - 1], outline=(60, 60, 60))
                draw.text((x + 2, y + tile_h + 1), _fit(draw, f"class {class_id}", f, tile_w), fill=DIM, font=f)
                draw.text((x + 2, y + tile_h + 1 + lh), _fit(draw, "(no more wells)", f, tile_w), fill=DIM, font=f)
                boxes[-1].append(None)
                continue
            rec = records[c]
            img.paste(resize(composite(row_sites[c], limits, low, high), (tile_w, tile_h)), (x, y))
            draw.text((x, y + tile_h + 1), _fit(draw, f"class {class_id}{_well_kind(rec)}", f, tile_w),
                      fill=TEXT, font=f)
            draw.text((x, y + tile_h + 1 + lh), _fit(draw, rec.id_code, f, tile_w), fill=DIM, font=f)
            boxes[-1].append((x, y, x + tile_w, y + tile_h))
            codes[-1].append(rec.id_code)
    return Sheet(img, boxes, codes)


# ------------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _class_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one class id")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="data set (competition or RxRx1 release layout)")
    p.add_argument("--id-code", metavar="ID", help="well to show, e.g. HEPG2-01_1_B03 (default: the first train site)")
    p.add_argument("--site", type=int, default=1, metavar="N", help="site of the well(s) (default: %(default)s)")
    p.add_argument("--out", type=Path, metavar="PNG",
                   help="composite PNG (default: site.png, unless only a contact sheet is asked for)")
    p.add_argument("--legend", action="store_true", help="add a channel legend under the composite")
    g = p.add_argument_group("contact sheet")
    g.add_argument("--contact-sheet", type=Path, metavar="PNG", help="write a grid of classes x wells here")
    g.add_argument("--classes", type=int, default=8, metavar="N",
                   help="the first N labelled classes, one row each (default: %(default)s)")
    g.add_argument("--class-ids", type=_class_list, metavar="A,B,C", help="these classes instead of the first N")
    g.add_argument("--wells", type=int, default=6, metavar="K",
                   help="wells per class, spread over the experiments (default: %(default)s)")
    g.add_argument("--stretch", choices=("site", "sheet"), default="site",
                   help="contrast limits per site, or shared by the whole sheet to keep intensity differences "
                        "(default: %(default)s)")
    d = p.add_argument_group("display")
    d.add_argument("--scale", type=float, metavar="S", help="resize factor (default: a whole number reaching "
                   f"~{TILE_TARGET} px for small sites, else 1; below 1 shrinks, e.g. 0.25 for 512 px sheets)")
    d.add_argument("--percentile", type=float, default=HIGH_PERCENTILE, metavar="P",
                   help="white point of each channel (default: %(default)s)")
    d.add_argument("--low-percentile", type=float, default=LOW_PERCENTILE, metavar="P",
                   help="black point of each channel (default: %(default)s)")
    return p


def _label(row: pd.Series) -> str:
    if row["sirna"] >= 0:
        return f"class {row['sirna']} ({row['well_type']}, {row['split']})"
    return f"unlabelled {row['well_type']} ({row['split']})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.classes < 1 or args.wells < 1:
        parser.error("--classes and --wells must be at least 1")
    if args.scale is not None and not args.scale > 0:
        parser.error("--scale must be positive")
    if not 0 <= args.low_percentile < args.percentile <= 100:
        parser.error("need 0 <= --low-percentile < --percentile <= 100")
    want_site = args.out is not None or args.id_code is not None or args.contact_sheet is None
    try:
        table = metadata.load_table(args.data)
        if args.contact_sheet is not None:
            classes = choose_classes(table, args.site, args.classes, args.class_ids)
            title = (f"{args.data.resolve().name}: {len(classes)} classes x up to {args.wells} wells, site {args.site}, "
                     f"stretch {args.low_percentile:g}-{args.percentile:g} percentile per {args.stretch}")
            sheet = contact_sheet(table, classes, args.wells, args.site, args.scale, args.low_percentile,
                                  args.percentile, args.stretch, title)
            save_png(sheet.image, args.contact_sheet)
            shown = sum(b is not None for row in sheet.boxes for b in row)
            print(f"wrote {args.contact_sheet} ({sheet.image.width}x{sheet.image.height}): {len(classes)} classes "
                  f"x {args.wells} wells ({shown} tiles), classes {_summary(classes)}")
        if want_site:
            out = args.out or Path("site.png")
            row = find_site(table, args.id_code, args.site)
            site = read_site(row["image_prefix"])
            rgb = composite(site, low=args.low_percentile, high=args.percentile)
            img = resize(rgb, scaled_size(site.shape[1], site.shape[2], args.scale))
            if args.legend:
                img = with_legend(img)
            save_png(img, out)
            print(f"wrote {out} ({img.width}x{img.height}): {row['id_code']} site {row['site']}, {_label(row)}, "
                  f"{site.shape[2]}x{site.shape[1]} px")
    except DataError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return exit_status(e)  # 1: not in this data set (a command-line mistake is argparse's 2, above)
    except OSError as e:
        print(f"{PROG}: error: cannot write the picture: {_one_line(e)}", file=sys.stderr)
        return exit_status(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
