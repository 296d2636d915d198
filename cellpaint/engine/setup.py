"""A run's model, optimizer and settled settings: what the modes build before their loops.

`resolve` settles every "auto" of the settings once, for this device and this data (what a
checkpoint then records); `build_model`, `make_optimizer` and `prepare_model` make the network,
Adam over its learning-rate groups, and the module the loops call (channels-last, compiled, DDP);
`model_for_inference` does all of it for the checkpoint of --load (val and predict).
"""
from __future__ import annotations

import logging
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from cellpaint.core.errors import InputError, UsageError
from cellpaint.core.settings import AUTO, ModelSettings, OptimSettings, Settings
from cellpaint.engine import autoselect, distributed
from cellpaint.engine.checkpoints import (check_channels, check_classes, check_data_set, load_checkpoint, made_with,
                                          restore_weights)
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import Data, load_data, site_image_size
from model import CellClassifier

log = logging.getLogger("cellpaint")


# ------------------------------------------------------------------------------ settled settings


def _least_free_gpu_memory(device: torch.device, world) -> int:
    """Free memory of this process's GPU, the least over the processes of a torchrun: every process
    must build the same network, and it has to fit on the fullest card."""
    free = torch.cuda.mem_get_info(device)[0]
    if not world.distributed:
        return free
    values = [0.0] * world.size
    values[world.rank] = float(free)
    return int(min(distributed.sum_all(values, world)))


def resolve_backbone(m: ModelSettings, ctx: RunContext, data: Data, batch_size: int, precision: str,
                     made_with: str | None = None, training: bool = True) -> str:
    """The backbone `--backbone auto` stands for on this device (logged with the reason).

    A checkpoint made with another backbone keeps its own (`made_with`: a bare weights file has
    none); between densenet161 and mem-densenet161 (one set of weights) the choice is made again
    for this device. Inference always takes densenet161: the memory-efficient variant saves
    memory only when gradients are kept."""
    if m.backbone != AUTO:
        return m.backbone
    if made_with and not autoselect.is_densenet161_pair(made_with):
        log.info("backbone auto -> %s: the backbone the checkpoint was made with", made_with)
        return made_with
    if not training:
        log.info("backbone auto -> %s: inference keeps no activations for the backward pass, so the "
                 "memory-efficient variant would save nothing", autoselect.FAST)
        return autoselect.FAST
    size = site_image_size(data)
    if size is None:
        size = (512, 512)
        log.warning("image size unknown (first training image unreadable): the backbone choice assumes 512x512")
    device = ctx.device
    free = _least_free_gpu_memory(device, ctx.world) if device.type == "cuda" else None
    choice = autoselect.choose_backbone(device.type, precision, batch_size, size, free)
    log.info("backbone auto -> %s: %s", choice.backbone, choice.reason)
    return choice.backbone


def resolve_precision(precision: str, fp16: bool, device: torch.device) -> str:
    """fp16, bf16 or fp32 for `--precision` (auto: fp16 on CUDA when --fp16, else fp32)."""
    if precision == AUTO:
        return "fp16" if device.type == "cuda" and fp16 else "fp32"
    return precision


def resolve(s: Settings, ctx: RunContext, data: Data, made_with: str | None = None,
            training: bool = True) -> Settings:
    """`s` with every "auto" settled, once, for this device and this data: the device used, the
    precision, channels-last, the backbone and, when none was given, a random seed (the same in
    every process of a torchrun). What a checkpoint records, and what the loops read."""
    precision = resolve_precision(s.exec.precision, s.exec.fp16, ctx.device)
    channels_last = s.exec.channels_last
    if channels_last == AUTO:
        channels_last = autoselect.choose_channels_last(ctx.device.type, precision)
        log.info("channels-last auto -> %s (%s, %s)", "on" if channels_last else "off", ctx.device.type, precision)
    backbone = resolve_backbone(s.model, ctx, data, s.data.batch_size, precision, made_with, training)
    seed = s.seed
    if seed is None:  # drawn once, by rank 0: every process must shuffle and augment alike
        seed = distributed.from_main(int.from_bytes(os.urandom(4), "little") % 10 ** 9, ctx.world)
        log.info("seed %d (drawn: give --seed to choose it)", seed)
    split = s.data.split if data is None else data.split  # the layout's own split, for `auto`
    return s.replace(exec={"device": str(ctx.device), "precision": precision, "channels_last": channels_last},
                     model={"backbone": backbone}, data={"split": split}, seed=seed)


# -------------------------------------------------------------------------------- model, optimizer


def build_model(m: ModelSettings, n_classes: int, n_cell_types: int, pretrained: str, *,
                in_channels: int) -> CellClassifier:
    """The network of `m` for `in_channels`-channel images (the data's: `Data.channels`)."""
    return CellClassifier(m.backbone, n_classes, n_cell_types, in_channels=in_channels, embedding_size=m.embedding_size,
                          head_hidden=None if m.head_hidden is None else list(m.head_hidden),
                          concat_cell_type=m.concat_cell_type, bn_mom=m.bn_mom, pretrained=pretrained,
                          stem_init=m.stem_init, head=m.head, bottleneck_bn=m.bottleneck_bn)


def check_input_sizes(s: Settings, model: CellClassifier, data: Data, device: torch.device) -> None:
    """Refuse (UsageError, one line) a backbone too deep for the run's images, or for the crops of
    --tta-size: its feature map would shrink below one pixel in the first batch, as a traceback.
    One forward pass of a blank site per size, in eval mode (no statistics move, no random draw)."""
    size = site_image_size(data)
    if size is None:
        return
    sizes = [tuple(size)]
    if s.inference.tta_size < 1:  # dataset.tta_views: crops of that fraction of the edge
        sizes.append(tuple(max(1, round(v * s.inference.tta_size)) for v in size))
    backbone = model.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for h, w in sizes:
                try:
                    backbone(torch.zeros(1, model.in_channels, h, w, device=device))
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, ValueError, AssertionError) as e:  # the input's size is all that can be wrong
                    what = (f"{h}x{w} images" if (h, w) == sizes[0] else
                            f"the {h}x{w} crops of --tta-size {s.inference.tta_size} (images {size[0]}x{size[1]})")
                    raise UsageError(f"--backbone {s.model.backbone} cannot take {what}: "
                                     f"{(str(e).splitlines() or [type(e).__name__])[0][:160]}; choose a shallower "
                                     "backbone or larger images" + (", or a larger --tta-size" if len(sizes) > 1 else "")
                                     ) from None
    finally:
        backbone.train(was_training)


def loss_classes(o: OptimSettings, data: Data) -> torch.Tensor | None:
    """The classes the loss is taken over: all (None), or the treatment classes (`--loss-classes
    treatment`: the 41st place's outputs, which had no control classes)."""
    if o.loss_classes == "all":
        return None
    return torch.as_tensor(data.structure.treatment_classes, dtype=torch.long)


def lr_param_groups(o: OptimSettings, model: CellClassifier) -> list[dict]:
    """Parameter groups with their `lr_mult`: the backbone's parameters named by `--lr-groups`
    prefixes at those multipliers (the 41st place: stem 1/3, dense blocks 1/2), the rest of the
    backbone at `--backbone-lr-mult`, neck and heads at 1x. A prefix matching no parameter name
    is an error (a typo would otherwise silently train at the wrong rate)."""
    named = list(model.backbone.named_parameters())
    spec = o.lr_groups.groups if o.lr_groups else ()
    for prefixes, _ in spec:
        for prefix in prefixes:
            if not any(name.startswith(prefix) for name, _ in named):
                tops = sorted({name.split(".")[0] for name, _ in named})
                raise UsageError(f"--lr-groups: no backbone parameter name starts with {prefix!r} "
                                 f"(top-level names: {', '.join(tops[:12])})")
    buckets: list[list] = [[] for _ in spec]
    rest = []
    for name, param in named:
        index = o.lr_groups.group_of(name) if spec else None
        (rest if index is None else buckets[index]).append(param)
    groups = [{"params": b, "lr_mult": mult, "name": ",".join(prefixes)} for b, (prefixes, mult) in zip(buckets, spec)]
    if rest:
        groups.append({"params": rest, "lr_mult": o.backbone_lr_mult, "name": "backbone"})
    in_backbone = {id(p) for _, p in named}
    head = [p for p in model.parameters() if id(p) not in in_backbone]
    return groups + [{"params": head, "lr_mult": 1.0, "name": "neck and heads"}]


def make_optimizer(o: OptimSettings, model: CellClassifier) -> torch.optim.Optimizer:
    """Adam over `lr_param_groups`, each at its multiple of the schedule's rate."""
    groups = lr_param_groups(o, model)
    lr = o.lr(0, o.epochs)
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    return torch.optim.Adam(groups, lr=lr, weight_decay=o.wd)


def prepare_model(s: Settings, ctx: RunContext, model: CellClassifier, training: bool) -> torch.nn.Module:
    """The module the loops call: channels-last and/or compiled on request, and for `training` in a
    torchrun wrapped in DDP. Checkpoints keep saving the plain `model` (a compiled wrapper would
    prefix every weight's name)."""
    device, world, x = ctx.device, ctx.world, s.exec
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    if x.channels_last:
        model.to(memory_format=torch.channels_last)
    if x.sync_bn and training and world.distributed:
        if device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs (torchrun with NCCL): PyTorch's SyncBatchNorm "
                             "does not run on the CPU")
        # batch statistics over all processes' samples: matters when -b per GPU is small. The
        # layers are swapped inside `model`, so checkpoints keep the same weight names.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    runner = torch.compile(model) if x.compile else model
    if world.distributed and training:
        # a head the loss does not use (c = 0 or 1) gets no gradient: DDP must be told to expect that
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=not 0 < s.optim.metric_loss_coeff < 1)
    return runner


def unwrap(runner: torch.nn.Module) -> torch.nn.Module:
    """The module for inference: without DDP, whose forward would sync buffers across processes that
    may run different numbers of inference batches."""
    return runner.module if isinstance(runner, DistributedDataParallel) else runner


def model_for_inference(s: Settings, ctx: RunContext, state: dict | None = None
                        ) -> tuple[Settings, Data, torch.nn.Module, dict]:
    """The data and the network of --load, ready for inference (val and predict): (the settings
    resolved, the data, the module, the checkpoint read)."""
    state = state or load_checkpoint(s.run.load)
    data = load_data(s.data, s.exec, training=False)
    check_classes(data, state)
    check_channels(data, state, s.run.load)
    check_data_set(s, data, state)
    s = resolve(s, ctx, data, made_with=made_with(state), training=False)
    model = build_model(s.model, data.structure.n_classes, len(data.structure.cell_types), "none",
                        in_channels=data.channels)
    restore_weights(model, inference_weights(state, s.inference.weights, s.run.load), s.run.load)
    check_input_sizes(s, model.to(ctx.device), data, ctx.device)
    return s, data, prepare_model(s, ctx, model.to(ctx.device), training=False), state


def inference_weights(state: dict, which: str, path: str) -> dict:
    """`state` with the weights --inference-weights chooses as its "model": a checkpoint trained
    with --model-ema holds the average beside the trained weights, and `auto` takes the average."""
    average = state.get("model_ema")
    if which == "raw" or (which == "auto" and average is None):
        if average is not None:
            log.info("%s: inferring with the trained weights, not the EMA weights it also holds (--inference-weights "
                     "raw)", path)
        return state
    if average is None:
        raise InputError(f"--inference-weights ema: {path} holds no EMA weights (it was trained without --model-ema)")
    log.info("%s: inferring with its EMA weights (after %d steps; --inference-weights raw takes the trained ones)",
             path, average["steps"])
    return {**state, "model": average["weights"]}
