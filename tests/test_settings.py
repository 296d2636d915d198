"""Settings at the edge: the command line converted once into typed settings, written beside a run."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
from cellpaint.data.wells import sites_by_well, sum_sites
from cellpaint.core import settings as S
from cellpaint.core.schedule import LRSchedule
from tests.conftest import ROOT, SMALL, run


def test_settings_are_typed_frozen_and_converted_once():
    args = main.parse_args(["--save", "runs/x", "--lr", "const,1e-3", "--pl-epoch", "3", "--head-hidden", "8,4",
                            "--val-experiments", "A,B", "--flips", "hv", "--tta", "2"])
    s = S.settings_from_args(args)
    assert (s.data.root, s.data.val_experiments, s.model.head_hidden) == (Path("../data"), ("A", "B"), (8, 4))
    assert (s.optim.lr(0, 10), s.pseudo.first_epoch, s.pseudo.epochs, s.inference.tta) == (1e-3, 3, 90, 2)
    assert s.augment == S.augment_from_args(args) and not s.augment.transposes
    assert s.run.mode == "train" and s.run.save == "runs/x" and s.data.seed == s.optim.seed == args.seed
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.data.batch_size = 3
    # nothing but parsed values on the namespace: the run's runtime objects live in a RunContext
    assert not {"world", "given", "resume_state", "load_state", "epoch_now"} & set(vars(args))


def test_the_pixel_stats_cache_is_an_explicit_setting():
    def cache(*argv):
        return S.settings_from_args(main.parse_args(list(argv))).data.stats_cache

    assert cache("--save", "runs/x") == Path("runs/cache")  # beside the outputs, as before
    assert cache("--save", "runs/x", "--cache-dir", "/tmp/stats") == Path("/tmp/stats")
    args = main.parse_args(["--save", "runs/x"])
    args.save, args.load = None, "ckpts/net.3"
    assert S.settings_from_args(args).data.stats_cache == Path("ckpts/cache")


def test_library_modules_do_not_read_the_namespace():
    for path in ("cellpaint/engine/setup.py", "cellpaint/modes/pseudo_labels.py", "cellpaint/modes/train.py",
                 "cellpaint/engine/distributed.py", "cellpaint/modes/predict.py"):
        text = (ROOT / path).read_text()
        assert not re.search(r"(?<![.\w])args\.(?!json)\w", text), path


def test_a_training_run_writes_its_resolved_settings(tiny_competition, tmp_path):
    save = tmp_path / "net"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--cv-number", -1, "--lr", "const,1e-3",
               *SMALL) == 0
    written = json.loads(Path(f"{save}.args.json").read_text())
    assert set(written) == {"data", "model", "optim", "augment", "pseudo", "inference", "run"}
    assert written["data"]["root"] == str(tiny_competition[0]) and written["data"]["stats_cache"] == str(tmp_path / "cache")
    assert written["model"]["backbone"] == "smallcnn"
    assert LRSchedule.parse(written["optim"]["lr"]) == LRSchedule.parse("const,1e-3")
    assert written["run"]["save"] == str(save) and written["optim"]["seed"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the checkpoint keeps the plain parsed values (what --resume and --load read back)
    saved = torch.load(save, weights_only=True)["args"]
    assert saved["lr"] == written["optim"]["lr"] and saved["backbone"] == "smallcnn" and "world" not in saved


def test_settings_are_written_atomically(tmp_path, monkeypatch):
    s = S.settings_from_args(main.parse_args(["--save", str(tmp_path / "x")]))
    path = tmp_path / "x.args.json"
    S.save_settings(str(path), s)
    before = path.read_text()
    assert json.loads(before)["optim"]["epochs"] == 90

    def broken(obj, f, **kwargs):
        f.write("{ half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.json, "dump", broken)
    with pytest.raises(OSError):
        S.save_settings(str(path), dataclasses.replace(s, optim=dataclasses.replace(s.optim, epochs=3)))
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.args.json"]


def test_sites_by_well_groups_what_sum_sites_sums():
    rows = pd.DataFrame({"id_code": ["a", "a", "b", "b", "c"]})
    values = np.array([[1, 2], [3, 4], [5, 6], [np.nan, np.nan], [np.nan, 0]], dtype=np.float64)
    wells = sites_by_well(rows["id_code"], values)
    assert list(wells) == ["a", "b"]  # c: no readable site
    assert all(v.dtype == np.float32 for vs in wells.values() for v in vs) and len(wells["b"]) == 1
    summed_rows, sums = sum_sites(rows, values)
    assert np.allclose(np.stack([np.sum(wells[c], axis=0) for c in summed_rows["id_code"]]), sums)
