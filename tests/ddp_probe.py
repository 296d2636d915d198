"""main.py run as torchrun (or plain python) starts it, with observers that record what the
distributed parity tests (test_distributed.py) compare; not a test module itself.

    PROBE_OUT=DIR [PROBE_BN=identity] python -m torch.distributed.run ... tests/ddp_probe.py MAIN-ARGS
    PROBE_OUT=DIR [PROBE_BN=identity] python tests/ddp_probe.py MAIN-ARGS

The run is the project's own (main.main: loaders, DDP, train_one_epoch, evaluate); the observers
only look, through hooks that need no change to production code:
- every batch of a training loader (random or same-plate batches): the dataset rows it holds;
- every optimizer step (a global step pre-hook): the learning rate of each parameter group, how
  many training batches came before it, and, at the first step, each parameter and its gradient
  (what the optimizer is about to apply: DDP has averaged it over the processes by then);
- the network's state when inference starts (the first eval-mode forward after training).

PROBE_BN=identity builds the network with every BatchNorm an identity: its output then no longer
depends on the other samples of the batch, so N processes at `-b B` and one at `-b N*B` compute
the same function. (A "ghost" BatchNorm in the one-process run, statistics over each process's
share, is the same function only up to float rounding: activations differed by up to 1.7e-6,
enough to flip a near-tie of the first max-pooling (one 2x2 window of 21,504 within 1e-5), which
sends a whole gradient entry elsewhere: the first layers' gradients then differed by up to 8e-3
of their largest entry. With identities the forward passes are bitwise equal, with and without
ATEN_CPU_CAPABILITY=default, and the gradients differ only by the order of the batch sums.)
The record goes to DIR/rank<RANK>.pt.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.module import register_module_forward_pre_hook  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402


def main(argv: list[str]) -> int:
    out = Path(os.environ["PROBE_OUT"])
    if os.environ.get("PROBE_BN") == "identity":  # before the network is built: it looks them up in torch.nn
        nn.BatchNorm1d = nn.BatchNorm2d = nn.Identity

    import dataset
    import main as entry
    from cellpaint.engine.distributed import GroupBatchSampler, ShardSampler
    from model import CellClassifier

    record: dict = {"batches": [], "steps": [], "first_step": None, "inference_states": []}
    names: dict[int, str] = {}
    trained = [False]  # a training forward ran since the last inference started

    loader_iter = dataset.SkippingLoader.__iter__

    def recording_iter(loader):
        training = (isinstance(loader.sampler, ShardSampler) and loader.sampler.seed is not None) \
            or isinstance(loader.batch_sampler, GroupBatchSampler)  # --batch-sampling plate|experiment
        for batch in loader_iter(loader):
            if training:
                record["batches"].append(batch[2].tolist())
            yield batch

    dataset.SkippingLoader.__iter__ = recording_iter

    def on_step(optimizer, args, kwargs) -> None:
        record["steps"].append({"lr": [g["lr"] for g in optimizer.param_groups], "after_batches": len(record["batches"])})
        if record["first_step"] is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            record["first_step"] = {
                "names": [names[id(p)] for p in params],
                "params": [p.detach().clone() for p in params],
                "grads": [None if p.grad is None else p.grad.detach().clone() for p in params]}

    def on_forward(module, args) -> None:
        if not isinstance(module, CellClassifier):
            return
        if module.training:
            if not names:
                names.update({id(p): n for n, p in module.named_parameters()})
            trained[0] = True
        elif trained[0]:
            trained[0] = False
            record["inference_states"].append({k: v.detach().clone() for k, v in module.state_dict().items()})

    register_optimizer_step_pre_hook(on_step)
    register_module_forward_pre_hook(on_forward)
    rc = entry.main(argv)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{os.environ.get('RANK', '0')}.pt")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
