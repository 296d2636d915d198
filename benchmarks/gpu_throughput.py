#!/usr/bin/env python3
"""The 1st place's settings beside ours, on one CUDA card, in one run:

    python benchmarks/gpu_throughput.py [--also timm-convnext_small,...] [--json OUT.json]

1. Model throughput on random data on the device (the model's ceiling): images/s of a training step
   (forward, both losses, backward, Adam step) and of inference with the 8 TTA views, and peak memory,
   for
     - the original's settings: mem-densenet161, fp16 autocast, no channels-last (the 1st place's
       code; our model computes the same function, so this is its speed on this card);
     - ours: what `--backbone auto --channels-last auto` resolve to on this card (logged with why);
     - ours + torch.compile, timed after its warm-up (the warm-up, compilation included, apart), so
       that `--compile` can be made the default if it wins;
     - any --also backbones with our settings.
2. A whole training epoch of the pipeline (engine.train_one_epoch: loader, augmentation on the
   device, cutmix, AMP, optimizer) with our settings, reading the PNGs with all cores as loader
   workers, then reading the decoded cache (prepare.py), with how busy the GPU was (utilisation
   sampled every 0.2 s). The data: a 512 px synthetic set written once to --data (and its cache to
   --cache); its sites are repeated to make --epoch-samples samples.

Without CUDA it refuses in one line (exit 2): CPU figures are not what it is for.
`--smoke-test-on-cpu` runs every part tiny on the CPU to check the script itself (figures meaningless).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
import main as trainer  # noqa: E402
import synthetic  # noqa: E402
from cellpaint.data import synthetic as synthetic_data  # noqa: E402
from cellpaint.data import image_cache  # noqa: E402
from cellpaint.engine import autoselect  # noqa: E402
from cellpaint.engine.context import RunContext  # noqa: E402
from cellpaint.engine.data import load_data, make_dataset, make_loader  # noqa: E402
from cellpaint.engine.epoch import train_one_epoch  # noqa: E402
from cellpaint.engine.setup import build_model, make_optimizer, prepare_model, resolve  # noqa: E402
from model import CellClassifier, combined_loss, smooth_labels  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


@dataclass(frozen=True)
class Setting:
    """One row of the model table."""
    label: str
    backbone: str
    precision: str
    channels_last: bool
    compile: bool = False


@dataclass(frozen=True)
class Sizes:
    size: int
    batch: int
    classes: int
    steps: int
    warmup: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(setting: Setting, sizes: Sizes, device: torch.device) -> dict:
    """Train and TTA-8 images/s after warm-up, peak memory, and the warm-up's seconds (compilation)."""
    dtype = DTYPES[setting.precision]
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = CellClassifier(setting.backbone, sizes.classes, 4, pretrained="none", in_channels=6).to(device, memory_format=fmt)
    runner = torch.compile(model) if setting.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randn(sizes.batch, 6, sizes.size, sizes.size, device=device).to(memory_format=fmt)
    cell = torch.eye(4, device=device)[torch.randint(0, 4, (sizes.batch,), device=device)]
    target = smooth_labels(torch.randint(0, sizes.classes, (sizes.batch,), device=device), sizes.classes)
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def train_step() -> None:
        with autocast():
            loss = combined_loss(runner(x, cell), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer_step() -> None:
        for view in dataset.tta_views(x, 8):
            with autocast():
                runner(view.contiguous(memory_format=fmt), cell)

    result = {**asdict(setting)}
    for name, step in (("train", train_step), ("infer_tta8", infer_step)):
        model.train(name == "train")
        tic = time.perf_counter()
        for _ in range(sizes.warmup):
            step()
        sync(device)
        result[f"{name}_warmup_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(sizes.steps):
            step()
        sync(device)
        result[f"{name}_img_s"] = sizes.batch * sizes.steps / (time.perf_counter() - tic)
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del model, runner, optimizer
    if setting.compile:
        torch._dynamo.reset()  # the next row must not reuse (or be slowed by) this one's graphs
    return result


class GpuBusy:
    """Mean GPU utilisation (%) over a `with` block, sampled every 0.2 s through NVML (torch's
    wrapper, or nvidia-smi when pynvml is missing); None where neither can be read."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()

    def read(self) -> float | None:
        if self.device.type != "cuda":
            return None
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - pynvml not installed: ask nvidia-smi
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", str(index)], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> "GpuBusy":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def ensure_data(data: Path, cache: Path, size: int, workers: int) -> None:
    """A synthetic set at `size` px (written once, then reused) and its decoded cache."""
    info = data / synthetic_data.INFO_FILE
    if not (info.exists() and json.loads(info.read_text()).get("complete")):
        print(f"writing a {size} px synthetic set to {data} (once)", file=sys.stderr, flush=True)
        argv = [str(data), "--image-size", str(size), "--classes", "24", "--train-experiments", "1,1,1,1",
                "--test-experiments", "0,0,0,0", "--no-leak", "--seed", "0", "-q"]
        if synthetic.main(argv) != 0:
            raise SystemExit("error: synthetic data generation failed")
    image_cache.build_cache(data, cache, workers=workers, progress=False)


def epoch(data: Path, cache: Path | None, setting: Setting, batch: int, workers: int, samples: int,
          device: torch.device, work: Path) -> dict:
    """One training epoch of `samples` sites through the real pipeline (engine), timed, GPU busy %."""
    argv = ["--data", str(data), "--save", str(work / "net"), "--backbone", setting.backbone, "--pretrained", "none",
            "--precision", setting.precision, "--channels-last", str(setting.channels_last).lower(),
            "-b", str(batch), "--num-data-workers", str(workers), "--cv-number", "-1", "--seed", "0",
            "--disp-batches", "1000000", "--device", str(device)]
    s = trainer.parse_settings(argv + (["--image-cache", str(cache)] if cache else []))
    ctx = RunContext(device=device)
    data_ = load_data(s.data, s.exec)
    s = resolve(s, ctx, data_)
    rows = data_.subsets["train"]
    rows = rows.iloc[[i % len(rows) for i in range(samples)]].reset_index(drop=True)  # sites repeated
    model = build_model(s.model, data_.structure.n_classes, len(data_.structure.cell_types), "none",
                        in_channels=data_.channels).to(device)
    optimizer = make_optimizer(s.optim, model)
    scaler = torch.amp.GradScaler(device.type, enabled=s.exec.autocast_dtype == torch.float16)
    runner = prepare_model(s, ctx, model, training=True)
    loader = make_loader(s, ctx.world, make_dataset(s, data_, rows, s.augment), epoch=0)
    sync(device)
    tic = time.perf_counter()
    with GpuBusy(device) as busy:
        train_one_epoch(s, ctx, runner, loader, optimizer, scaler, 0, data_.structure.n_classes, {"bad_steps": 0})
        sync(device)
    seconds = time.perf_counter() - tic
    n = len(loader) * batch  # the loader drops the last partial batch in training
    return {"input": "decoded cache" if cache else f"PNGs, {workers} workers", "samples": n, "seconds": seconds,
            "img_s": n / seconds, "gpu_busy_pct": busy.mean}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--classes", type=int, default=1139)
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--also", default="", help="comma-separated backbones measured with our settings too")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    p.add_argument("--no-epoch", action="store_true", help="leave out the pipeline epochs")
    p.add_argument("--epoch-samples", type=int, default=3000, help="samples in each pipeline epoch")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers of the PNG epoch")
    p.add_argument("--data", type=Path, default=None,
                   help="synthetic set for the epochs, written once (default: TMP/cellpaint-bench-SIZE)")
    p.add_argument("--cache", type=Path, default=None, help="decoded cache of --data (default: DATA-cache)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows (and the machine) as JSON here")
    p.add_argument("--smoke-test-on-cpu", action="store_true",
                   help="run every part tiny on the CPU to check this script (figures meaningless)")
    args = p.parse_args(argv)
    smoke = args.smoke_test_on_cpu
    if not smoke and not torch.cuda.is_available():
        print(f"error: no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
              f"this benchmark measures a GPU; nothing was run", file=sys.stderr)
        return 2
    if smoke:  # tiny and on the CPU: every code path, no meaningful figure
        args.size, args.batch, args.steps, args.warmup, args.classes = 32, 2, 1, 1, 10
        args.no_compile, args.epoch_samples, args.workers = True, 4, 1
    device = torch.device("cpu" if smoke else "cuda")
    args.data = args.data or Path(tempfile.gettempdir()) / f"cellpaint-bench-{args.size}"
    sizes = Sizes(args.size, args.batch, args.classes, args.steps, args.warmup)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        free, total = torch.cuda.mem_get_info(device)
        card = f"{torch.cuda.get_device_name(device)}, {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free"
    else:
        free, card = None, f"CPU ({platform.processor() or platform.machine()}) - smoke test, figures meaningless"
    choice = autoselect.choose_backbone(device.type, "fp16", args.batch, (args.size, args.size), free)
    channels_last = autoselect.choose_channels_last(device.type, "fp16")
    print(f"{card}; torch {torch.__version__}; {args.size} px, batch {args.batch}, {args.classes} classes")
    print(f"auto on this card: {choice.backbone}, channels-last {'on' if channels_last else 'off'} ({choice.reason})")

    precision = "fp16" if device.type == "cuda" else "fp32"  # CPU autocast only emulates: slow, and beside the point
    settings = [Setting("original (1st place)", autoselect.LEAN, precision, False),
                Setting("ours (auto)", choice.backbone, precision, channels_last)]
    if not args.no_compile:
        settings.append(Setting("ours + compile", choice.backbone, precision, channels_last, compile=True))
    settings += [Setting("ours, --also", name, precision, channels_last) for name in filter(None, args.also.split(","))]

    header = (f"| settings | backbone | precision | channels-last | compile | train img/s | TTA-8 img/s | "
              f"peak GiB | warm-up s (train) |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for s in settings:
        r = measure(s, sizes, device)
        rows.append(r)
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"| {s.label} | {s.backbone} | {s.precision} | {'yes' if s.channels_last else 'no'} | "
              f"{'yes' if s.compile else 'no'} | {r['train_img_s']:.1f} | {r['infer_tta8_img_s']:.1f} | {peak} | "
              f"{r['train_warmup_s']:.1f} |", flush=True)

    epochs = []
    if not args.no_epoch:
        cache = args.cache or args.data.with_name(args.data.name + "-cache")
        ensure_data(args.data, cache, args.size, args.workers)
        ours = settings[1]
        print(f"\nwhole training epoch, {ours.backbone}, {ours.precision}, channels-last "
              f"{'on' if ours.channels_last else 'off'}, batch {args.batch}, {args.epoch_samples} samples "
              f"({args.size} px sites repeated); {os.cpu_count()} cores")
        print("| input | samples | seconds | img/s | GPU busy % |\n|---|---|---|---|---|")
        work = Path(tempfile.mkdtemp(prefix="cellpaint-epoch-"))
        try:
            for source in (None, cache):
                e = epoch(args.data, source, ours, args.batch, args.workers, args.epoch_samples, device, work)
                epochs.append(e)
                busy = "-" if e["gpu_busy_pct"] is None else f"{e['gpu_busy_pct']:.0f}"
                print(f"| {e['input']} | {e['samples']} | {e['seconds']:.1f} | {e['img_s']:.1f} | {busy} |", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"device": card, "torch": torch.__version__, "size": args.size,
                                         "batch": args.batch, "auto": asdict(choice), "rows": rows,
                                         "epochs": epochs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
