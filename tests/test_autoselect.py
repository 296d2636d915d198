"""The measured defaults: `--backbone auto` and `--channels-last auto` (pure rules, fake GPU memory),
and what a run records of them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from cellpaint.engine import autoselect as A
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import load_data, site_image_size
from cellpaint.engine.setup import resolve_backbone
from tests.conftest import SMALL, run

GIB = 2 ** 30
ROOT = Path(__file__).resolve().parents[1]


def test_cpu_takes_the_plain_densenet():
    choice = A.choose_backbone("cpu", "fp32", 24, (512, 512), None)
    assert choice.backbone == "densenet161" and "cpu" in choice.reason


def test_gpu_choice_follows_the_measured_memory():
    # the 1st place's settings: 15.07 GiB measured, x1.15 headroom = 17.3 GiB
    assert A.estimated_peak_gib("fp16", 24, (512, 512)) == pytest.approx(15.07)
    assert A.choose_backbone("cuda", "fp16", 24, (512, 512), 80 * GIB).backbone == "densenet161"
    assert A.choose_backbone("cuda", "fp16", 24, (512, 512), int(17.4 * GIB)).backbone == "densenet161"
    short = A.choose_backbone("cuda", "fp16", 24, (512, 512), int(17.2 * GIB))
    assert short.backbone == "mem-densenet161"
    assert "15.1 GiB" in short.reason and "17.2 GiB" in short.reason and "batch 24, 512x512" in short.reason
    # scaled by batch x pixels: batch 48 at 512 px needs twice as much, 256 px a quarter
    assert A.estimated_peak_gib("fp16", 48, (512, 512)) == pytest.approx(2 * 15.07)
    assert A.choose_backbone("cuda", "fp16", 48, (512, 512), 24 * GIB).backbone == "mem-densenet161"
    assert A.choose_backbone("cuda", "fp16", 24, (256, 256), 5 * GIB).backbone == "densenet161"
    # fp32 keeps three times the activations
    assert A.choose_backbone("cuda", "fp32", 24, (512, 512), 40 * GIB).backbone == "mem-densenet161"
    assert A.choose_backbone("cuda", "bf16", 24, (512, 512), 40 * GIB).backbone == "densenet161"
    with pytest.raises(ValueError):
        A.choose_backbone("cuda", "fp16", 24, (512, 512), None)


def test_channels_last_only_with_mixed_precision_on_cuda():
    assert A.choose_channels_last("cuda", "fp16") and A.choose_channels_last("cuda", "bf16")
    assert not A.choose_channels_last("cuda", "fp32") and not A.choose_channels_last("cpu", "bf16")


def test_defaults_are_auto_and_explicit_values_stay():
    s = main.parse_settings(["--save", "x"])
    assert s.model.backbone == "auto" and s.exec.channels_last == "auto" and not s.exec.compile
    s = main.parse_settings(["--save", "x", "--backbone", "mem-densenet161", "--channels-last", "false"])
    assert s.model.backbone == "mem-densenet161" and s.exec.channels_last is False


def _fake_gpu(monkeypatch, free_gib: float):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), 80 * GIB))


@pytest.mark.parametrize("free_gib, expected", [(0.05, "densenet161"), (0.03, "mem-densenet161")])
def test_resolve_backbone_on_a_fake_gpu(monkeypatch, tiny_competition, free_gib, expected):
    """The trainer's resolution with the data's real image size (24 px) and a fake card: batch 24 at
    24 px needs 15.07 x 24²/512² = 0.033 GiB, 0.038 with the headroom."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), 80 * GIB))
    s = main.parse_settings(["--data", str(tiny_competition[0]), "--save", "x", "--num-data-workers", "0"])
    data = load_data(s.data, s.exec)
    assert site_image_size(data) == (24, 24)
    ctx = RunContext(device=torch.device("cuda"))
    assert resolve_backbone(s.model, ctx, data, s.data.batch_size, "fp16") == expected
    # a checkpoint of the pair is chosen for again (same weights); any other keeps its backbone
    for made_with, want in (("mem-densenet161", expected), ("timm-convnext_atto", "timm-convnext_atto")):
        assert s.model.backbone == "auto"
        assert resolve_backbone(s.model, ctx, data, s.data.batch_size, "fp16", made_with) == want


def test_a_run_records_the_resolved_choice(monkeypatch, tiny_competition, tmp_path):
    """The plumbing of a run: on the CPU auto is the plain network without channels-last; the checkpoint
    holds the resolved name, not 'auto', and prediction from a bare weights file (no recorded backbone)
    resolves to the same network. DenseNet161 cannot take the 24 px test images (its pools run out of
    pixels), so smallcnn stands in for it as the plain choice."""
    monkeypatch.setattr(A, "FAST", "smallcnn")
    save = tmp_path / "net"
    argv = [a for i, a in enumerate(SMALL) if a != "--backbone" and (i == 0 or SMALL[i - 1] != "--backbone")]
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--cv-number", 0, *argv) == 0
    state = torch.load(f"{save}.0", weights_only=True)
    assert state["settings"]["model"]["backbone"] == "smallcnn" and state["settings"]["exec"]["channels_last"] is False
    log = (tmp_path / "net.log").read_text()
    assert "backbone auto -> smallcnn: on cpu" in log and "channels-last auto -> off (cpu, fp32)" in log
    torch.save(state["model"], tmp_path / "bare.pth")
    assert run("--data", tiny_competition[0], "--mode", "predict", "--load", tmp_path / "bare.pth", *argv) == 0
    assert "backbone auto -> smallcnn: inference" in (tmp_path / "bare.pth.output.log").read_text()


@pytest.mark.parametrize("command", [[sys.executable, "benchmarks/gpu_throughput.py"],
                                     ["bash", "benchmarks/gpu_check.sh", "OUT"]])
def test_gpu_benchmarks_refuse_without_cuda(tmp_path, command):
    """Without a GPU they say so in one line and exit 2, instead of measuring the CPU as if it were one."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable, "WORK": str(tmp_path / "work")}
    out = subprocess.run([c.replace("OUT", str(tmp_path / "out")) for c in command], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device visible") and "nothing was run" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
