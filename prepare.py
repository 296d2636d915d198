#!/usr/bin/env python3
"""Decode every site once into uint8 arrays, one per plate: the loader's image cache
(cellpaint/data/image_cache.py builds and reads it).

    python prepare.py --data DIR --cache CACHE_DIR [--workers N] [--skip-bad-images]
    python main.py --image-cache CACHE_DIR ...        (train / val / predict then read the cache)

Resumable: a plate already in the cache is skipped, so an interrupted build loses at most the
plate it was on.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from cellpaint.cli import entry
from cellpaint.data.image_cache import build_cache


def prepare(args: argparse.Namespace) -> None:
    s = build_cache(args.data, args.cache, workers=max(1, args.workers), skip_bad_images=args.skip_bad_images,
                    progress=not args.quiet)
    if not s["plates_decoded"]:
        print(f"{args.cache}: complete ({s['sites']} sites in {s['plates']} plates), nothing to do")
    else:
        print(f"{args.cache}: decoded {s['sites_decoded']} sites in {s['plates_decoded']} plates "
              f"({s['plates'] - s['plates_decoded']} were already complete"
              + (f"; {s['stale']} decoded again: their images changed since" if s["stale"] else "")
              + f") in {s['seconds']:.0f}s"
              + (f"; {s['bad']} bad site(s) recorded" if s["bad"] else ""))
    print(f"use it with: python main.py --data {args.data} --image-cache {args.cache} ...")


def main(argv: list[str] | None = None) -> int:
    """Exit status (cellpaint/core/errors.py): 0 the cache is complete; 1 the data or the cache cannot
    be used (the one line names the file); 2 the command line is wrong; 130/143 interrupted, the
    plates decoded so far kept."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../data"), help="data set (either layout)")
    p.add_argument("--cache", type=Path, required=True, help="cache directory (created; resumed if it exists)")
    p.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="record sites with missing/corrupt images as bad instead of stopping")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return entry.run(lambda: prepare(args),
                     interrupted=f"interrupted: the plates of {args.cache} decoded so far are kept; run the same "
                                 "command again to go on")


if __name__ == "__main__":
    sys.exit(main())
