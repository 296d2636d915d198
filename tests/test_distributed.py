"""Several processes (torchrun, gloo on the CPU): the same steps and gradients as one process with
the same global batch, one network at inference, sharding, one set of outputs, resume, prediction.

Distributed training is checked by exact properties, not by comparing accuracies: a dozen epochs
scored on 64 sites vary by about +-0.1 between seeds (and between CPUs), which hides any real
defect, while Adam ignores the scale of a gradient, so a sum-vs-mean slip across processes would
not show in weights or accuracy either. What is compared is what the optimizer is handed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from cellpaint.engine import distributed
from cellpaint.data.prediction_file import load_predictions
from cellpaint.data.synthetic_config import SyntheticConfig
from cellpaint.data.synthetic import generate
from tests.conftest import ROOT, run

# A data set on which the small CNN learns within a dozen epochs, with 64 validation sites
# (2 of the 8 train experiments per cell type, fold 0 of 2).
LEARNABLE = SyntheticConfig(layout="competition", cell_types=("HEPG2", "HUVEC"), train_experiments=(4, 4),
                            test_experiments=(1, 1), classes=8, positive_controls=2, negative_wells=1,
                            image_size=32, drop_wells=0.0, signal=3.0, batch_effect=0.3, noise=0.5, leak=False,
                            seed=4)
EPOCHS = 12
ARGS = ["--device", "cpu", "--backbone", "smallcnn", "--pretrained", "none", "--embedding-size", "32", "--num-data-workers", "0",
        "--seed", "5", "--threads", "1", "--folds", "2", "--cv-number", "0", "--cutmix", "0", "-e", str(EPOCHS),
        "--lr", "cosine,3e-3", "--pl-epoch", "10", "--pl-size-func", "0.5", "--disp-batches", "1000"]
PROCESSES = 2
PROBE = ROOT / "tests" / "ddp_probe.py"

# The parity runs: one epoch on 83 training sites (one site a well, 20% of the wells dropped), 2
# processes at -b 7 against one at -b 14, accumulating 2 batches a step. 83 = 5 * 14 + 13 is what
# the padding sampler got wrong: ceil(83 / 2) = 42 sites a process made 6 batches, and 3 steps,
# where one process runs 5 batches and 2 steps (the 6th batch repeating a sample).
PARITY = SyntheticConfig(layout="competition", cell_types=("HEPG2", "HUVEC"), train_experiments=(2, 2),
                         test_experiments=(1, 1), classes=8, positive_controls=2, negative_wells=1, image_size=16,
                         sites=1, drop_wells=0.2, leak=False, seed=7)
PARITY_SITES, PARITY_BATCH = 83, 7
PARITY_ARGS = ["--device", "cpu", "--backbone", "smallcnn", "--pretrained", "none", "--embedding-size", "32",
               "--num-data-workers", "0", "--seed", "5", "--threads", "1", "--folds", "2", "--cv-number", "0",
               "--cutmix", "0", "--gradient-accumulation", "2", "-e", "1", "--lr", "cosine,3e-3"]


def torchrun(*argv, ok: bool = True, script=ROOT / "main.py", env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
           str(script), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def probe(out, *argv, processes: int, env=None) -> list[dict]:
    """main.py under tests/ddp_probe.py's observers, in `processes` processes: each one's record."""
    env = {"PROBE_OUT": str(out), **(env or {})}
    if processes > 1:
        torchrun(*argv, script=PROBE, env=env)
    else:
        done = subprocess.run([sys.executable, str(PROBE), *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training, once with 2 processes of batch 8 (observed by the probe) and once with 1
    process of batch 16."""
    root = tmp_path_factory.mktemp("distributed")
    generate(root / "data", LEARNABLE, progress=False)
    probe(root / "probe", "--data", root / "data", "--save", root / "ddp" / "net", "-b", 8, *ARGS, processes=PROCESSES)
    assert run("--data", root / "data", "--save", root / "one" / "net", "-b", 16, *ARGS) == 0
    return root


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """One epoch with BatchNorm as identity (batch-independent), 2 processes at -b 7 and 1 at -b 14."""
    root = tmp_path_factory.mktemp("parity")
    generate(root / "data", PARITY, progress=False)
    identity = {"PROBE_BN": "identity"}
    ddp = probe(root / "ddp", "--data", root / "data", "--save", root / "ddp" / "net", "-b", PARITY_BATCH,
                *PARITY_ARGS, processes=PROCESSES, env=identity)
    one = probe(root / "one", "--data", root / "data", "--save", root / "one" / "net", "-b", PROCESSES * PARITY_BATCH,
                *PARITY_ARGS, processes=1, env=identity)[0]
    return root, ddp, one


def one_process_batches(n: int, batch: int, seed: int) -> list[list[int]]:
    """The batches of a plain single-process training loader: a seeded shuffle, the last partial
    batch dropped when there is more than one batch."""
    order = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    return [b.tolist() for b in DataLoader(range(n), batch_size=batch, sampler=order, drop_last=n > batch)]


def test_shards_make_up_the_single_process_batches():
    n, batch = 103, 4
    single = list(RandomSampler(range(n), generator=torch.Generator().manual_seed(42)))
    one = distributed.ShardSampler(n, distributed.World(), seed=42)
    assert list(one) == single and len(one) == n  # one process: the order of a plain shuffled loader
    shards = [list(distributed.ShardSampler(n, distributed.World(r, 3, distributed=True), seed=42, batch=batch))
              for r in range(3)]
    assert {len(s) for s in shards} == {n // (3 * batch) * batch}  # whole global batches, in every process
    for step in range(len(shards[0]) // batch):
        together = {i for s in shards for i in s[step * batch:(step + 1) * batch]}
        assert together == set(single[step * 3 * batch:(step + 1) * 3 * batch])
    inference = [list(distributed.ShardSampler(n, distributed.World(r, 3, distributed=True))) for r in range(3)]
    assert sorted(i for s in inference for i in s) == list(range(n))  # inference: each row once, no padding


@pytest.mark.parametrize("processes", [2, 3])
def test_shards_never_make_a_step_the_single_process_run_would_not(processes):
    """For every size up to a few global batches: the same number of steps as one process at a
    batch `processes` times as large, each step the same samples, none twice (31 sites, 2
    processes, -b 8 once made 2 steps, the second repeating a site, where one process at -b 16 runs
    one). Only fewer sites than processes are padded, one step in which every process has a site."""
    seed = 7
    for batch in (1, 3, 8):
        for n in range(1, 4 * processes * batch + 2):
            single = one_process_batches(n, processes * batch, seed)
            samplers = [distributed.ShardSampler(n, distributed.World(r, processes, distributed=True), seed, batch)
                        for r in range(processes)]
            shards = [[b.tolist() for b in DataLoader(range(n), batch_size=batch, sampler=s)] for s in samplers]
            assert [len(s) for s in samplers] == [sum(map(len, b)) for b in shards]
            assert [len(b) for b in shards] == [len(single)] * processes, (n, batch)
            for step, expected in enumerate(single):
                together = [i for b in shards for i in b[step]]
                if n >= processes:
                    assert sorted(together) == sorted(expected), (n, batch, step)
                else:
                    assert set(together) == set(expected) and len(together) == processes, (n, batch)


def test_distributed_gradient_equals_one_process_gradient(parity):
    """What the optimizer gets at the first step (after one accumulation group of 2 batches): DDP's
    gradient, averaged over the processes, equals the single-process gradient of the same global
    batch. Same weights at the start; BatchNorm an identity in both (see ddp_probe.py)."""
    _, ddp, one = parity
    first = [record["first_step"] for record in ddp]
    reference = one["first_step"]
    assert first[0]["names"] == reference["names"] and len(reference["names"]) > 10
    assert all(torch.equal(a, b) for a, b in zip(first[0]["params"], reference["params"]))  # the same start
    # every process steps with the same, reduced gradient
    assert all(torch.equal(a, b) for a, b in zip(first[0]["grads"], first[1]["grads"]))
    assert all(g is not None for g in reference["grads"])
    assert gradients_match(first[0]["grads"], reference["grads"], reference["names"])
    # the check sees a gradient summed over the processes instead of averaged
    assert not gradients_match([g * PROCESSES for g in first[0]["grads"]], reference["grads"], reference["names"])


def gradients_match(got: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]) -> bool:
    """Each parameter's gradient within float summation error of the expected one, and the total
    norms within 1e-5 of each other. Measured, with and without ATEN_CPU_CAPABILITY=default: the
    largest difference 1.0e-6 of the parameter's largest entry, the norm ratio 1 +- 1e-8; a
    gradient scaled by the number of processes is off by 100%."""
    for name, a, b in zip(names, got, expected):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())):
            print(f"{name}: largest difference {float((a - b).abs().max()):.3g} of {float(b.abs().max()):.3g}")
            return False
    ratio = float(torch.sqrt(sum((g.double() ** 2).sum() for g in got)) /
                  torch.sqrt(sum((g.double() ** 2).sum() for g in expected)))
    print(f"gradient norm ratio - 1: {ratio - 1:.3g}")
    return abs(ratio - 1) <= 1e-5


def test_an_epoch_has_the_same_steps_rates_and_samples(parity):
    """A whole epoch: as many optimizer steps as one process, each after the same batches and at the
    same learning rates, each batch of the processes together the one process's batch."""
    root, ddp, one = parity
    for name in ("ddp", "one"):  # the data set is still the one described above
        assert f"sites: train {PARITY_SITES}," in (root / name / "net.log").read_text()
    assert len(one["batches"]) == PARITY_SITES // (PROCESSES * PARITY_BATCH) == 5
    for record in ddp:
        assert record["steps"] == one["steps"] and len(one["steps"]) == 2
    assert [len(r["batches"]) for r in ddp] == [len(one["batches"])] * PROCESSES
    for k, expected in enumerate(one["batches"]):
        together = [i for record in ddp for i in record["batches"][k]]
        assert sorted(together) == sorted(expected), k
    # the logged training loss is the mean over every process's samples, not rank 0's alone (the
    # networks differ by rounding only: the same batches, forward passes and gradients; measured 1e-8)
    losses = [pd.read_csv(root / name / "net.metrics.csv")["train_loss"].iloc[0] for name in ("ddp", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_ranks_hold_one_network_when_inference_starts(runs):
    """Validation and pseudo-labelling are sharded: every process must score with the same weights
    and BatchNorm statistics, rank 0's (those its checkpoint saves), after every epoch."""
    states = [torch.load(runs / "probe" / f"rank{r}.pt", weights_only=True)["inference_states"]
              for r in range(PROCESSES)]
    assert len(states[0]) == len(states[1]) == EPOCHS
    for epoch, (a, b) in enumerate(zip(*states)):
        assert a.keys() == b.keys() and any("running_var" in k for k in a)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (epoch, differ[:5])
    saved = torch.load(runs / "ddp" / f"net.{EPOCHS - 1}", weights_only=True)["model"]
    assert all(torch.equal(saved[k], states[0][-1][k]) for k in saved)


def test_logged_validation_accuracy_equals_val_mode_on_the_checkpoint(runs, caplog):
    """Every epoch's: with rank 1 scoring its shard on its own BatchNorm statistics, 2 epochs of 12
    differed by a site (seed 5, as here; seed 7 too; the last epoch did not)."""
    logged = pd.read_csv(runs / "ddp" / "net.metrics.csv")
    for epoch in range(EPOCHS):
        caplog.clear()
        with caplog.at_level("INFO", logger="cellpaint"):
            assert run("--mode", "val", "--data", runs / "data", "--load", runs / "ddp" / f"net.{epoch}", *ARGS) == 0
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("validation: "))
        reported = {k: float(v) for k, v in (item.split() for item in line[len("validation: "):].split(", "))}
        assert set(reported) == {"acc", "acc_HEPG2", "acc_HUVEC"}
        for key, value in reported.items():  # logged to 4 decimals; one site of 64 is 0.0156
            assert value == pytest.approx(logged[key].iloc[epoch], abs=5e-5), (epoch, key)


def test_outputs_are_written_once(runs):
    files = sorted(p.name for p in (runs / "ddp").iterdir())
    assert files == sorted(p.name for p in (runs / "one").iterdir())
    assert {"net", "net.0", f"net.{EPOCHS - 1}", "net.log", "net.metrics.csv"} <= set(files)
    log = (runs / "ddp" / "net.log").read_text()
    assert log.count("epoch 0: train_loss") == 1 and "[rank 1]" not in log  # one log, by rank 0
    assert log.count("pseudo-labels at epoch 10:") == 1
    # the checkpoint holds the pseudo-labels rank 0 logged choosing. How many depends on the model
    # (a well whose class went to a more confident well of its plate is dropped, not replaced), so
    # the count is checked against the log and the schedule, not against the one-process run's
    labelled = re.findall(r"pseudo-labels at epoch \d+: .*, (\d+) of (\d+) wells labelled", log)
    state = torch.load(runs / "ddp" / f"net.{EPOCHS - 1}", weights_only=True)
    assert 0 < len(state["pseudo_labels"]) == int(labelled[-1][0]) <= round(0.5 * int(labelled[-1][1]))


def test_the_distributed_run_learns(runs):
    """Above chance on validation, a falling training loss (summed over the processes' samples):
    whether training works at all, not how well, which varies by about +-0.1 between seeds and CPUs.
    Measured for seeds 0-7, each with and without ATEN_CPU_CAPABILITY=default (16 runs): mean of the
    last 3 validation accuracies 0.29-0.50 (mean 0.42, sd 0.06; chance 0.125), last/first training
    loss 0.45-0.52. (The 2.5 x chance this asserted before failed for seed 7 without AVX: 0.29.)"""
    ddp = pd.read_csv(runs / "ddp" / "net.metrics.csv")
    chance = 1 / LEARNABLE.classes
    assert ddp["acc"].tail(3).mean() > 1.5 * chance, ddp["acc"].tolist()
    assert ddp["train_loss"].iloc[-1] < 0.7 * ddp["train_loss"].iloc[0], ddp["train_loss"].tolist()


def test_resume_continues_the_distributed_run(runs, tmp_path):
    shutil.copy(runs / "ddp" / f"net.{EPOCHS - 2}", tmp_path / f"net.{EPOCHS - 2}")
    torchrun("--data", runs / "data", "--resume", tmp_path / f"net.{EPOCHS - 2}", "-b", 8, *ARGS)
    a = torch.load(runs / "ddp" / f"net.{EPOCHS - 1}", weights_only=True)["model"]
    b = torch.load(tmp_path / f"net.{EPOCHS - 1}", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_distributed_prediction_equals_one_process(runs, tmp_path):
    shutil.copy(runs / "ddp" / "net", tmp_path / "net")
    torchrun("--mode", "predict", "--data", runs / "data", "--load", runs / "ddp" / "net", "--tta", 3, *ARGS)
    assert run("--mode", "predict", "--data", runs / "data", "--load", tmp_path / "net", "--tta", 3, *ARGS) == 0
    ddp = load_predictions(runs / "ddp" / "net.output")
    one = load_predictions(tmp_path / "net.output")
    for part in ("val", "test"):
        assert ddp[part].keys() == one[part].keys() and len(one[part]) > 0
        for code, sites in one[part].items():
            assert len(ddp[part][code]) == len(sites)
            assert np.allclose(np.stack(ddp[part][code]), np.stack(sites), atol=1e-4)


def test_sync_bn_on_the_cpu_is_refused_in_one_line(runs, tmp_path):
    done = torchrun("--data", runs / "data", "--save", tmp_path / "net", "-b", 8, *ARGS, "--sync-bn", ok=False)
    # our one line (torchrun then adds its own report of the failed processes)
    assert "ERROR [rank 0]: --sync-bn needs GPUs" in done.stderr
    assert not (tmp_path / "net.0").exists()
