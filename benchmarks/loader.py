#!/usr/bin/env python3
"""Benchmark the input pipeline at 512 px: samples/s per core of the loader (issue 6).

    python benchmarks/loader.py [--data DIR] [--cache DIR] [--repeats 3] [--batch-size 16]

1. Writes (once; reused afterwards) a 512 px synthetic set of ~310 sites (competition layout,
   4 train experiments) and its decoded-image cache (prepare.py).
2. Times one pass over all sites, training augmentation on (flips, zoom 0.5, jitter 0.1/0.1),
   `sample` normalisation, for:
   (a) the old loader: per sample decode (Pillow), flips and zoom crop on uint8, normalisation and
       jitter in float on the CPU (a reference copy of that implementation lives here, not in the library);
   (b) the uint8 PNG path: `SiteDataset(output="uint8")`; the loader only decodes, `prepare_batch`
       does the rest per batch (on the accelerator in training; timed here on the CPU, apart);
   (c) the cache path: (b) reading the decoded cache instead of the PNGs.
   Single process (num_workers=0, 1 torch thread), so that CPU seconds per sample are one core's;
   then the same with 2 loader workers (their CPU time from RUSAGE_CHILDREN once they have exited).
   `prepare_batch` is timed apart, on a few collected batches. With workers, each timed pass runs
   --laps times over the sites through one loader (so that starting the workers is amortised as in
   a real epoch); best of --repeats passes; the files are in the page cache.
Prints a markdown table with the machine (cores, CPU model, load average) for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms.v2.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import dataset  # noqa: E402
from cellpaint.data import images  # noqa: E402
from cellpaint.data import metadata  # noqa: E402
from cellpaint.data import image_cache  # noqa: E402
import synthetic  # noqa: E402
from cellpaint.data import synthetic as synthetic_data  # noqa: E402
from cellpaint.data import pixel_stats
from cellpaint.data import augment
from cellpaint.core.settings import AugmentSettings

SYNTHETIC = ["--image-size", "512", "--classes", "24", "--train-experiments", "1,1,1,1",
             "--test-experiments", "0,0,0,0", "--no-leak", "--pixel-stats", "--seed", "0", "-q"]
AUGMENT = AugmentSettings(min_scale=0.5, scale_std=0.1, bias_std=0.1)
CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")


# ------------------------------------------------------------- (a) the old loader, for reference


class OldSiteDataset(Dataset):
    """The per-sample float loader as it was before the uint8 path (reference copy)."""

    def __init__(self, rows, augment: AugmentSettings, seed: int = 0) -> None:
        self.prefixes = rows["image_prefix"].to_numpy()
        self.cell_index = [CELL_TYPES.index(c) for c in rows["cell_type"]]
        self.labels = rows["sirna"].to_numpy()
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return len(self.prefixes)

    @staticmethod
    def read_site(prefix: str) -> np.ndarray:
        planes = []
        for c in range(1, 7):
            with Image.open(f"{prefix}_w{c}.png") as img:
                img.load()
                planes.append(np.asarray(img))
        return np.stack(planes)

    @staticmethod
    def random_zoom_crop(img, rng, min_scale):
        h, w = img.shape[-2:]
        s = rng.uniform(min_scale, 1)
        ch, cw = max(1, round(h * s)), max(1, round(w * s))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[..., top:top + ch, left:left + cw]
        return crop if (ch, cw) == (h, w) else TF.resize(crop, [h, w], antialias=True)

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        img = torch.from_numpy(self.read_site(self.prefixes[index]))
        img = augment.dihedral(img, int(rng.integers(8)))
        img = self.random_zoom_crop(img, rng, self.augment.min_scale).contiguous()
        x = img.float()
        x = (x - x.mean(dim=(-2, -1), keepdim=True)) / x.std(dim=(-2, -1), keepdim=True).clamp_min(pixel_stats.MIN_STD)
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        scale = 1 + self.augment.scale_std * torch.randn((6, 1, 1), generator=g)
        bias = self.augment.bias_std * torch.randn((6, 1, 1), generator=g)
        cell = torch.zeros(len(CELL_TYPES))
        cell[self.cell_index[index]] = 1
        return x * scale + bias, cell, index, int(self.labels[index])


# ---------------------------------------------------------------------------------- measuring


def children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def one_pass(ds, batch_size: int, workers: int, laps: int) -> dict:
    """Wall and CPU seconds of `laps` passes over `ds` through one loader (as one long epoch would be).

    CPU: this process with no workers; else the workers' (from RUSAGE_CHILDREN once they have exited).
    """
    loader_cls = DataLoader if isinstance(ds, OldSiteDataset) else dataset.SkippingLoader
    loader = loader_cls(ds, batch_size=batch_size, num_workers=workers, sampler=list(range(len(ds))) * laps,
                        worker_init_fn=lambda _: torch.set_num_threads(1))
    n = 0
    children = children_cpu()
    cpu, wall = time.process_time(), time.perf_counter()
    for x, *_ in loader:
        n += len(x) if isinstance(x, torch.Tensor) else len(x["image"])
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    del loader  # workers exit and are reaped: their CPU time is in RUSAGE_CHILDREN
    return {"n": n, "wall": wall, "cpu": cpu if workers == 0 else children_cpu() - children}


def measure(ds, repeats: int, batch_size: int, workers: int, laps: int) -> dict:
    """Best of `repeats`: samples/s (wall) and samples/s per core (CPU)."""
    runs = []
    for r in range(repeats):
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(r)
        else:
            ds.epoch = r
        runs.append(one_pass(ds, batch_size, workers, laps))
    n = runs[0]["n"]
    return {"n": n, "wall_rate": n / min(r["wall"] for r in runs), "per_core": n / min(r["cpu"] for r in runs)}


def measure_prepare(ds, repeats: int, batch_size: int, batches: int = 4) -> float:
    """prepare_batch on the CPU (the accelerator's work in training): samples/s on one core, best of `repeats`."""
    loader = dataset.SkippingLoader(ds, batch_size=batch_size)
    collected = [x for (x, *_), _ in zip(loader, range(batches))]
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for x in collected:
            dataset.prepare_batch(x, "cpu")
        best = min(best, time.process_time() - t)
    return sum(len(x["image"]) for x in collected) / best


def measure_decode(prefixes, repeats: int) -> dict[str, float]:
    """Decoding alone, samples/s on one core: Pillow (the old loader) and libpng (images.read_png)."""
    files = [f"{prefix}_w{c}.png" for prefix in prefixes for c in range(1, 7)]
    out = {}
    for name, decode in (("Pillow", images.read_png_pillow), ("libpng", images.read_png)):
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            for f in files:
                decode(f)
            best = min(best, time.process_time() - t)
        out[name] = len(prefixes) / best
    return out


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{os.cpu_count()} cores ({model}), {mem:.0f} GB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}")


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def ensure_data(data: Path, cache: Path) -> None:
    info = data / synthetic_data.INFO_FILE
    if not (info.exists() and json.loads(info.read_text()).get("complete")):
        print(f"writing the 512 px synthetic set to {data} (minutes, once)", file=sys.stderr)
        if synthetic.main([str(data), *SYNTHETIC]) != 0:
            raise SystemExit("synthetic data generation failed")
    image_cache.build_cache(data, cache, workers=os.cpu_count() or 1, progress=False)


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 22):
                pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "synthetic_data" / "loader512")
    p.add_argument("--cache", type=Path, default=None, help="default: DATA_cache beside the data")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="loader workers of the multi-process runs")
    p.add_argument("--laps", type=int, default=3,
                   help="passes over the sites per timed loader (amortises starting the workers, as an epoch does)")
    args = p.parse_args(argv)
    cache = args.cache or args.data.with_name(args.data.name + "_cache")
    ensure_data(args.data, cache)
    torch.set_num_threads(1)

    table = metadata.load_table(args.data)
    warm([f"{prefix}_w{c}.png" for prefix in table["image_prefix"] for c in range(1, 7)])
    warm(sorted(cache.glob("*/*.npy")))
    decoded = image_cache.ImageCache.open(cache, args.data, table)
    paths = {
        "(a) old: per-sample float": lambda: OldSiteDataset(table, AUGMENT),
        "(b) uint8 from PNGs": lambda: dataset.SiteDataset(table, CELL_TYPES, augment=AUGMENT, output="uint8"),
        "(c) uint8 from the cache": lambda: dataset.SiteDataset(table, CELL_TYPES, augment=AUGMENT, output="uint8",
                                                              cache=decoded),
    }
    started = load()
    rows = []
    for name, make in paths.items():
        for workers in (0, args.workers):
            r = measure(make(), args.repeats, args.batch_size, workers, args.laps if workers else 1)
            if "uint8" in name and workers == 0:
                r["prepare_per_core"] = measure_prepare(make(), args.repeats, args.batch_size)
            rows.append((name, workers, r))
            print(f"{name}, {workers} workers: {r}", file=sys.stderr)

    decode = measure_decode(table["image_prefix"].tolist(), args.repeats)
    print(f"decoding alone: {decode}", file=sys.stderr)

    print(f"Measured {datetime.date.today()} with `python benchmarks/loader.py --repeats {args.repeats} "
          f"--laps {args.laps}`: {len(table)} sites of 6 x 512 x 512 px (synthetic, 4 experiments), "
          f"{args.laps} laps over them per timed pass with workers (1 without), batch {args.batch_size}, training augmentation "
          f"(flips, zoom crop 0.5-1, jitter 0.1/0.1), `sample` normalisation; best of {args.repeats} passes.\n")
    print(f"- Machine: {machine()}.")
    print(f"- Load average (1/5/15 min) before: {started}, after: {load()}.\n")
    print("| path | loader workers | samples/s (wall) | samples/s per core | "
          "+ prepare_batch on the CPU: samples/s per core |")
    print("|---|---|---|---|---|")
    for name, workers, r in rows:
        prep = "-"
        if "prepare_per_core" in r:
            prep = f"{1 / (1 / r['per_core'] + 1 / r['prepare_per_core']):.0f} (prepare alone {r['prepare_per_core']:.0f})"
        print(f"| {name} | {workers} | {r['wall_rate']:.0f} | {r['per_core']:.0f} | {prep} |")
    for name, rate in decode.items():
        print(f"| decoding the 6 PNGs alone, {name} | 0 | - | {rate:.0f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
