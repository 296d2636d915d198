"""What `--backbone auto` and `--channels-last auto` mean on the device at hand, chosen by measurement.

DenseNet161 and its memory-efficient twin `mem-densenet161` have the same weights and compute the same
function: the `mem-` variant only recomputes each dense layer's bottleneck in the backward pass
instead of keeping it. On one H100 at the 1st place's settings (batch 24, 512 px, fp16) the plain one
trains 1.5x faster with channels-last (231 vs 132 img/s) for 15.1 GiB of peak memory instead of 6.8
(benchmarks/RESULTS.md). So `auto` takes the plain one whenever its estimated peak fits in the free
memory of the GPU, and the memory-efficient one otherwise.

The rule, in `choose_backbone`: estimated peak = measured peak at batch 24, 512x512 px for the
precision (fp16/bf16 15.1 GiB, fp32 45.1 GiB) x (batch / 24) x (pixels / 512²); densenet161 when
estimate x 1.15 <= free GPU memory (the 15% covers allocator fragmentation and cuDNN workspaces that
vary by card and version), else mem-densenet161. The estimate treats all memory as proportional to
batch x pixels, which overstates it a little for large batches (weights and Adam's state, ~0.5 GiB,
do not grow) and understates it for tiny ones (where it is far below any card's memory anyway).
On the CPU: densenet161 (memory is host RAM; recomputation would only cost time).

Channels-last (`choose_channels_last`): on CUDA with mixed precision (fp16/bf16), where it added
18-23% to DenseNet161's training speed on the H100 (tensor-core convolutions want NHWC); off on the
CPU and in fp32 (not measured to help there).
"""
from __future__ import annotations

from dataclasses import dataclass

FAST, LEAN = "densenet161", "mem-densenet161"  # the same weights: see the module docstring

GIB = 2 ** 30
# Peak CUDA memory of a DenseNet161 training step of this project's model (6-channel stem, neck, both
# heads, 1,139 classes, Adam) at the reference batch and size: benchmarks/RESULTS.md, H100, torch 2.11.
REFERENCE_BATCH, REFERENCE_PIXELS = 24, 512 * 512
DENSENET161_PEAK_GIB = {"fp16": 15.07, "bf16": 15.08, "fp32": 45.05}
HEADROOM = 1.15


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone `--backbone auto` resolved to, and why (logged as one line)."""
    backbone: str
    reason: str


def estimated_peak_gib(precision: str, batch_size: int, image_hw: tuple[int, int]) -> float:
    """DenseNet161's training peak scaled from the measured one by batch x pixels (see the docstring)."""
    pixels = image_hw[0] * image_hw[1]
    return DENSENET161_PEAK_GIB[precision] * batch_size / REFERENCE_BATCH * pixels / REFERENCE_PIXELS


def choose_backbone(device_type: str, precision: str, batch_size: int, image_hw: tuple[int, int],
                    free_bytes: int | None) -> BackboneChoice:
    """densenet161 when it fits (or on the CPU), mem-densenet161 when GPU memory is short.

    `precision`: 'fp16', 'bf16' or 'fp32' (what the run's autocast uses); `free_bytes`: free memory of
    the GPU this process trains on (the least over the processes of a torchrun), None on the CPU.
    """
    if device_type != "cuda":
        return BackboneChoice(FAST, f"on {device_type}: memory is host RAM, recomputing activations "
                                    f"({LEAN}) would only cost time")
    if free_bytes is None:
        raise ValueError("free_bytes is needed on a GPU")
    need = estimated_peak_gib(precision, batch_size, image_hw)
    free = free_bytes / GIB
    fits = need * HEADROOM <= free
    rule = (f"{FAST} needs about {need:.1f} GiB at batch {batch_size}, {image_hw[0]}x{image_hw[1]} px, "
            f"{precision} (measured {DENSENET161_PEAK_GIB[precision]:.1f} GiB at batch {REFERENCE_BATCH}, "
            f"512x512, scaled by batch x pixels), x{HEADROOM} headroom, and {free:.1f} GiB of GPU memory are free")
    if fits:
        return BackboneChoice(FAST, rule + f": it fits (the same weights as {LEAN}, ~1.5x faster to train)")
    return BackboneChoice(LEAN, rule + f": too little, so the memory-efficient {LEAN} (same weights, "
                                       f"about half the memory, ~40% slower)")


def choose_channels_last(device_type: str, precision: str) -> bool:
    """Channels-last on CUDA with mixed precision; off on the CPU and in fp32."""
    return device_type == "cuda" and precision in ("fp16", "bf16")


def is_densenet161_pair(name: str | None) -> bool:
    """densenet161 or mem-densenet161: one set of weights, so `auto` may choose between them again."""
    return name in (FAST, LEAN)
