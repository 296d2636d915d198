#!/usr/bin/env python3
"""Training and TTA-inference throughput of the model, per precision and memory format, one table.

    python benchmarks/gpu_throughput.py                                   # DenseNet161, 512 px, CUDA
    python benchmarks/gpu_throughput.py --device cpu --size 64 --batch 4 --backbone densenet121 --steps 2

Random data on the device (the input pipeline is benchmarks/loader.py's business), so the numbers
are the model's ceiling: images/s for a training step (forward, both losses, backward, Adam step)
and for inference with 8 TTA views, plus peak device memory of each configuration.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset  # noqa: E402
from model import CellClassifier, combined_loss, smooth_labels  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, device: torch.device, precision: str, channels_last: bool) -> dict:
    dtype = DTYPES[precision]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = CellClassifier(args.backbone, args.classes, 4, pretrained="none").to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randn(args.batch, 6, args.size, args.size, device=device).to(memory_format=fmt)
    cell = torch.eye(4, device=device)[torch.randint(0, 4, (args.batch,), device=device)]
    target = smooth_labels(torch.randint(0, args.classes, (args.batch,), device=device), args.classes)
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step() -> None:
        with autocast():
            loss = combined_loss(model(x, cell), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer_step() -> None:
        for view in dataset.tta_views(x, 8):
            with autocast():
                model(view.contiguous(memory_format=fmt), cell)

    result = {"precision": precision, "channels_last": channels_last}
    for name, step in (("train", train_step), ("infer_tta8", infer_step)):
        model.train(name == "train")
        for _ in range(args.warmup):
            step()
        sync(device)
        tic = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        result[f"{name}_img_s"] = args.batch * args.steps / (time.perf_counter() - tic)
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="densenet161")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--classes", type=int, default=1139)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", default="fp16,bf16,fp32")
    p.add_argument("--json", type=Path, default=None, help="also write the rows (and the machine) as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, {args.classes} classes on {name}, torch {torch.__version__}")
    print(f"{'precision':<10}{'channels_last':>14}{'train img/s':>13}{'TTA-8 img/s':>13}{'peak GiB':>10}")
    rows = []
    for precision in args.precisions.split(","):
        if device.type == "cpu" and precision == "fp16":
            continue  # fp16 autocast is a GPU feature; on the CPU it would only measure emulation
        for channels_last in (False, True):
            r = measure(args, device, precision, channels_last)
            rows.append(r)
            print(f"{precision:<10}{str(channels_last):>14}{r['train_img_s']:>13.1f}{r['infer_tta8_img_s']:>13.1f}"
                  f"{r['peak_mem_gib']:>10.2f}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next configuration's peak starts from nothing
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "backbone": args.backbone,
                                         "size": args.size, "batch": args.batch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
