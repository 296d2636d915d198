"""--model-ema: an exponential moving average of the weights, the network that infers when it is on.

Polyak averaging (the 6th and 11th places; the 2nd place's mean teacher is the same average):
after every optimizer step t (1, 2, ...) the average moves towards the trained weights,

    ema <- d_t * ema + (1 - d_t) * weights,   d_t = min(DECAY, 1 - t^(-2/3))   (d_1 = 0: a copy)

timm's `ModelEmaV3` does the arithmetic (warm-up with gamma 1 and power 2/3, its defaults: early
on the average forgets the random start quickly; after ~(1 - DECAY)^(-3/2) steps the decay is
DECAY's). BatchNorm running statistics are averaged the same way; integer buffers are copied.
Training keeps going on the trained weights; validation, pseudo-labelling and prediction take
the average (--inference-weights says otherwise). A checkpoint holds both and the step count, so
--resume continues the average exactly.
"""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3

from cellpaint.engine import distributed

WARMUP_GAMMA = 1.0
WARMUP_POWER = 2 / 3


def ema_decay(decay: float, step: int) -> float:
    """d_t of the docstring's formula (what ModelEmaV3 computes with these settings), for step t >= 1."""
    return 0.0 if step <= 1 else min(decay, 1 - (1 + (step - 1) / WARMUP_GAMMA) ** -WARMUP_POWER)


class WeightAverage:
    """The moving average of `model`'s weights (a copy, updated in place by `update`)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.source = model
        self.average = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_gamma=WARMUP_GAMMA,
                                  warmup_power=WARMUP_POWER)
        self.steps = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.average.module

    def update(self) -> None:
        """After an optimizer step of the source model."""
        self.steps += 1
        self.average.update(self.source, step=self.steps)

    def for_inference(self, world: distributed.World) -> torch.nn.Module:
        """The averaged network; under torchrun with rank 0's buffers (each process averages the
        BatchNorm statistics of its own share of the batches; the parameters agree already)."""
        distributed.broadcast_buffers(self.module, world)
        return self.module

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.steps = int(state["steps"])
