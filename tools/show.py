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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script (python tools/show.py): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellpaint.data import metadata  # noqa: E402
from cellpaint.data.images import read_site  # noqa: E402,F401 - show.read_site is part of this tool's API
from cellpaint.cli import entry  # noqa: E402
from cellpaint.core.errors import DataError, OutputError  # noqa: E402
# the pictures themselves; show.composite stays part of this tool's API
from tools.picture import (BACKGROUND, DIM, HIGH_PERCENTILE, LOW_PERCENTILE, TEXT, TILE_TARGET,  # noqa: E402,F401
                           _fit, _fitting_size, _line_height, _wrap, channel_limits, composite, font, legend,
                           resize, save_png, scaled_size, with_legend)

PROG = "python -m tools.show"


class ShowError(DataError):
    """A request this tool cannot satisfy (unknown id_code, unlabelled class, ...): one line for the user."""


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
    return entry.run(lambda: show(args), report=lambda line: print(f"{PROG}: error: {line}", file=sys.stderr))


def show(args: argparse.Namespace) -> None:
    """The pictures the arguments ask for: a contact sheet, a site, or both."""
    want_site = args.out is not None or args.id_code is not None or args.contact_sheet is None
    table = metadata.load_table(args.data)
    if args.contact_sheet is not None:
        classes = choose_classes(table, args.site, args.classes, args.class_ids)
        title = (f"{args.data.resolve().name}: {len(classes)} classes x up to {args.wells} wells, site {args.site}, "
                 f"stretch {args.low_percentile:g}-{args.percentile:g} percentile per {args.stretch}")
        sheet = contact_sheet(table, classes, args.wells, args.site, args.scale, args.low_percentile,
                              args.percentile, args.stretch, title)
        write_picture(sheet.image, args.contact_sheet)
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
        write_picture(img, out)
        print(f"wrote {out} ({img.width}x{img.height}): {row['id_code']} site {row['site']}, {_label(row)}, "
              f"{site.shape[2]}x{site.shape[1]} px")


def write_picture(img, path: Path) -> None:
    try:
        save_png(img, path)
    except OSError as e:
        raise OutputError(f"cannot write the picture: {_one_line(e)}") from None


if __name__ == "__main__":
    sys.exit(main())
