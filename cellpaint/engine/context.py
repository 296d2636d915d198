"""What a run holds besides its settings: the process group and the device. Runtime objects, made
once by the command line, passed explicitly and never saved (settings are what a checkpoint keeps)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cellpaint.engine.distributed import World


@dataclass(frozen=True)
class RunContext:
    world: World = field(default_factory=World)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
