"""Several processes: `torchrun --nproc_per_node N main.py ...` (NCCL on GPUs, gloo on CPUs).

Each process trains on its shard of every epoch's shuffled order with DistributedDataParallel;
`-b` is the batch per process, so the global batch is N times it (as in torchvision's references).
Inference is sharded too and gathered, so every process holds all predictions: validation
accuracy and pseudo-labelling see the whole val/test set. Only rank 0 writes files and logs.

Without torchrun (WORLD_SIZE unset) everything here is a no-op and the order of samples is
exactly that of a single-process run.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from cellpaint.core.errors import UsageError
from cellpaint.data.sampling import group_batches


class LaunchError(UsageError, RuntimeError):
    """A torchrun launch that cannot work as asked (more processes than GPUs on a node)."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run; `distributed` when started by torchrun
    (also with one process: then the collectives run, trivially, e.g. to check NCCL on one GPU)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment; the device this process uses."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                  distributed=True)
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise LaunchError(f"process {world.local_rank} of this node has no GPU of its own: "
                               f"{torch.cuda.device_count()} visible; use --nproc_per_node "
                               f"{torch.cuda.device_count()} (or --device cpu to run on the CPU with gloo)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    # a long timeout: rank 0 may spend many minutes on pseudo-labelling or writing predictions
    # while the others wait at the next collective
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return world, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """This process's share of the data set: positions rank, rank + N, rank + 2N, ... of an order.

    With `seed` (training) the order is a seeded permutation cut to the steps a single process
    would run with a batch N times this process's `batch`: whole global batches (N * batch), the
    rest dropped as a single-process loader's drop_last drops it, or all samples in one step when
    they do not fill a global batch. Consecutive batches of the N processes then together hold
    exactly the samples of a single-process batch, every process runs the same number of steps,
    and no step holds a sample twice (padding to a multiple of N would: with N = 2, `-b 8` and 31
    samples, 2 batches of 8 per process, the second repeating a sample, where one process at
    `-b 16` runs one). Only fewer samples than processes are padded (by repeating), so that every
    process has one. `batch` None: no cut (all samples in one global batch).
    Without `seed` (inference) the order is the data set's and nothing is cut or padded.
    """

    def __init__(self, n: int, world: World, seed: int | None = None, batch: int | None = None) -> None:
        self.n, self.world, self.seed, self.batch = n, world, seed, batch

    def _kept(self) -> int:
        """How many samples of the seeded order the processes run together (before padding)."""
        full = self.n if self.batch is None else self.batch * self.world.size
        return self.n - self.n % full if self.n > full else self.n

    def indices(self) -> list[int]:
        if self.seed is None:
            return list(range(self.world.rank, self.n, self.world.size))
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()[:self._kept()]
        pad = max(self.world.size - len(order), 0)
        order += (order * (pad // max(len(order), 1) + 1))[:pad]
        return order[self.world.rank::self.world.size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        kept = self.n if self.seed is None else self._kept()
        if self.seed is not None and 0 < kept < self.world.size:
            kept = self.world.size  # padded
        return len(range(self.world.rank, kept, self.world.size))


class GroupBatchSampler(Sampler[list[int]]):
    """This process's batches of an epoch of same-domain batches (--batch-sampling plate|experiment):
    the global batches of `sampling.group_batches` (each from one group, its size a multiple of
    the process count), of which process r takes positions r, r + N, r + 2N, ... So the N shares
    of one step come from the same plate (experiment), together make the batch a single process
    would run at N times the batch size, and every process runs the same number of steps."""

    def __init__(self, groups: np.ndarray, world: World, seed: int, batch: int) -> None:
        self.world = world
        self.batches = group_batches(groups, batch, world.size, seed)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.world.rank::self.world.size].tolist()

    def __len__(self) -> int:
        return len(self.batches)


def gather_rows(parts: dict[str, np.ndarray], indices: np.ndarray, n: int, world: World) -> dict[str, np.ndarray]:
    """Arrays of `n` rows from every process's rows `indices` (each process calls this); rows that no
    process produced (sites skipped as unreadable) are NaN."""
    if not world.distributed and np.array_equal(indices, np.arange(n)):
        return parts
    gathered: list = [(indices, parts)]
    if world.distributed:
        gathered = [None] * world.size
        dist.all_gather_object(gathered, (indices, parts))
    out = {}
    for rows, arrays in gathered:  # a process with no rows (n < N) sent no arrays
        for key, values in arrays.items():
            if key not in out:
                out[key] = np.full((n, *values.shape[1:]), np.nan, dtype=values.dtype)
            out[key][rows] = values
    return out


def sum_all(values: list[float], world: World) -> list[float]:
    """Element-wise sums over the processes (e.g. loss totals and sample counts)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def all_true(flag: bool, world: World) -> bool:
    """Whether `flag` holds in every process: steps must be skipped by all or none."""
    return sum_all([float(not flag)], world)[0] == 0


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) in every process's `module`.

    DistributedDataParallel copies them from rank 0 only at the start of each training forward,
    so after the last training batch every process holds statistics updated by its own share of
    that batch. Inference (validation, pseudo-labelling) must see one network, the one rank 0
    saves: each process scores its shard, and the checkpoint's `--mode val` must give the same.
    """
    if not world.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def from_main(obj, world: World):
    """Rank 0's `obj` in every process: decisions made once and shared (e.g. pseudo-labels)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
