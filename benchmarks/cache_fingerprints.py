#!/usr/bin/env python3
"""What the caches' fingerprints cost: one stat per PNG (what data/source_files.py does), against a
content hash of each PNG (reading every byte) and against decoding it (what building a cache does).

    python benchmarks/cache_fingerprints.py [--data DIR] [--repeats 5]

Without --data a synthetic competition-layout set is generated in a temporary folder (512 px PNGs
of noise-like cells, so that the files have the real data's size order). Prints one small table:
microseconds per PNG, and the extrapolation to RxRx1's 753,060 PNGs.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellpaint.data import images, metadata  # noqa: E402
from cellpaint.data.source_files import plate_sources  # noqa: E402

RXRX1_PNGS = 125_510 * 6


def content_hash(table) -> str:
    h = hashlib.sha256()
    for prefix in table["image_prefix"]:
        for c in range(1, images.CHANNELS + 1):
            with open(f"{prefix}_w{c}.png", "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def decode(table) -> None:
    for prefix in table["image_prefix"]:
        images.read_site(prefix)


def timed(fn, table, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(table)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--image-size", type=int, default=512, help="of the generated set")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from cellpaint.data.synthetic import generate
            from cellpaint.data.synthetic_config import SyntheticConfig
            data = Path(tmp) / "data"
            generate(data, SyntheticConfig(layout="competition", cell_types=("HEPG2",), classes=8,
                                           train_experiments=(2,), test_experiments=(1,),
                                           image_size=args.image_size, leak=False, seed=1), progress=False)
        table = metadata.load_table(data)
        pngs = len(table) * images.discover(table["image_prefix"].to_numpy()).channels
        size = sum(Path(f"{p}_w1.png").stat().st_size for p in table["image_prefix"]) / len(table)
        rows = [("stat (size, mtime) per PNG: the fingerprint", timed(lambda t: plate_sources(t, images.discover(t["image_prefix"].to_numpy())), table,
                                                                          args.repeats)),
                ("sha256 of each PNG's bytes", timed(content_hash, table, args.repeats)),
                ("decode each PNG (building a cache)", timed(decode, table, max(1, args.repeats // 2)))]
        print(f"{pngs} PNGs of {len(table)} sites, {size / 1024:.0f} KiB per PNG on average; median of "
              f"{args.repeats} runs (files in the page cache after the first)")
        print(f"| method | µs per PNG | RxRx1's {RXRX1_PNGS:,} PNGs (s) |")
        print("|---|---|---|")
        for name, seconds in rows:
            per = seconds / pngs
            print(f"| {name} | {per * 1e6:.1f} | {per * RXRX1_PNGS:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
