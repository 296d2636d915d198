"""Settings at the edge: the command line converted once into typed settings, written beside a run."""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
from cellpaint.cli import flags
from cellpaint.core import settings as S
from cellpaint.core.errors import OutputError
from cellpaint.core.schedule import LRSchedule
from cellpaint.data.wells import sites_by_well, sum_sites
from tests.conftest import ROOT, SMALL, run


def test_settings_are_typed_frozen_and_converted_once():
    s = main.parse_settings(["--save", "runs/x", "--lr", "const,1e-3", "--pl-epoch", "3", "--head-hidden", "8,4",
                             "--val-experiments", "A,B", "--flips", "hv", "--tta", "2", "--seed", "7"])
    assert (s.data.root, s.data.val_experiments, s.model.head_hidden) == (Path("../data"), ("A", "B"), (8, 4))
    assert (s.optim.lr(0, 10), s.pseudo.first_epoch, s.optim.epochs, s.inference.tta) == (1e-3, 3, 90, 2)
    assert s.augment.flips and not s.augment.transposes
    assert s.run.mode == "train" and s.run.save == "runs/x" and s.seed == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.data.batch_size = 3


def test_every_flag_sets_settings_and_every_setting_has_a_flag():
    """cli/flags.py FIELDS is complete both ways: a flag added to main.py without a setting (or a
    setting without a flag) would silently not reach the run, or not come back on --resume."""
    dests = set(vars(main.build_parser().parse_args([])))
    assert dests == set(flags.FIELDS) | set(flags.COMMAND_ONLY)
    fields = {f for targets in flags.FIELDS.values() for f in targets}
    declared = {"seed"} | {f"{g.name}.{f.name}" for g in dataclasses.fields(S.Settings) if g.name != "seed"
                           for f in dataclasses.fields(typing.get_type_hints(S.Settings)[g.name])}
    assert fields == declared and sum(map(len, flags.FIELDS.values())) == len(fields)  # each set by one flag


def test_the_pixel_stats_cache_is_an_explicit_setting():
    def cache(*argv):
        return main.parse_settings(list(argv)).exec.stats_cache

    assert cache("--save", "runs/x") == Path("runs/cache")  # beside the outputs, as before
    assert cache("--save", "runs/x", "--cache-dir", "/tmp/stats") == Path("/tmp/stats")
    s = main.parse_settings(["--save", "runs/x"])
    assert flags.complete(s.replace(run={"save": None, "load": "ckpts/net.3"}, exec={"stats_cache": None})
                          ).exec.stats_cache == Path("ckpts/cache")


def test_settings_read_back_as_themselves():
    """Every setting a checkpoint records comes back equal (schedules, fractions, tuples, paths,
    None and "auto"), through JSON as the checkpoint and SAVE.args.json store them."""
    s = main.parse_settings(["--save", "runs/x", "--lr", "cosine,1.23456789e-4,90,6e-5,150,0", "--pl-epoch", "3",
                             "--pl-size-func", "0.6*x+0.4", "--lr-groups", "conv0,norm0=1/3,denseblock=1/2",
                             "--head-hidden", "8,4", "--val-experiments", "A,B", "--gamma-range", "0.8,1.2",
                             "--pw-aug", "0.2,0.3", "--flips", "hv", "--image-cache", "/c", "--seed", "4",
                             "--channels-last", "true", "--wd", "0", "--classes", "30"])
    back = S.settings_from_dict(json.loads(json.dumps(S.settings_dict(s))))
    assert back == s
    assert str(back.optim.lr) == "cosine,0.000123456789,90,6e-05,150,0"
    assert isinstance(back.optim.wd, float) and back.exec.channels_last is True and back.exec.image_cache == Path("/c")
    with pytest.raises(ValueError, match="unknown OptimSettings field"):
        S.settings_from_dict({**S.settings_dict(s), "optim": {**S.settings_dict(s)["optim"], "momentum": 0.9}})


def test_library_modules_do_not_read_the_namespace():
    library = [p for p in (ROOT / "cellpaint").rglob("*.py") if p.parent.name != "cli"]
    assert len(library) > 30
    for path in [*library, ROOT / "dataset.py", ROOT / "model.py"]:
        text = path.read_text()
        assert not re.search(r"(?<![.\w])args\.(?!json)\w", text) and "import argparse" not in text, path


def test_a_training_run_writes_its_resolved_settings(tiny_competition, tmp_path):
    save = tmp_path / "net"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--cv-number", -1, "--lr", "const,1e-3",
               *SMALL) == 0
    written = json.loads(Path(f"{save}.args.json").read_text())
    run_id = written.pop("run_id")  # whose outputs these are (engine/run_owner.py)
    assert set(written) == {"data", "model", "optim", "augment", "pseudo", "inference", "exec", "run", "seed"}
    assert written["data"]["root"] == str(tiny_competition[0]) and written["exec"]["stats_cache"] == str(tmp_path / "cache")
    assert written["model"]["backbone"] == "smallcnn"
    assert (written["exec"]["device"], written["exec"]["precision"], written["exec"]["channels_last"]) == ("cpu", "fp32", False)
    assert LRSchedule.parse(written["optim"]["lr"]) == LRSchedule.parse("const,1e-3")
    assert written["run"]["save"] == str(save) and written["seed"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the checkpoint keeps the same settings (what --resume and --load read back), and the run's id
    checkpoint = torch.load(save, weights_only=True)
    assert checkpoint["settings"] == written and checkpoint["run_id"] == run_id and len(run_id) == 32


def test_settings_are_written_atomically(tmp_path, monkeypatch):
    s = main.parse_settings(["--save", str(tmp_path / "x")])
    path = tmp_path / "x.args.json"
    S.save_settings(str(path), s)
    before = path.read_text()
    assert json.loads(before)["optim"]["epochs"] == 90

    def broken(obj, f, **kwargs):
        f.write("{ half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.json, "dump", broken)
    with pytest.raises(OutputError, match=f"cannot write {path}: No space left on device"):
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


def test_a_checkpoint_of_the_first_format_still_loads_and_resumes(trained, tiny_competition, tmp_path):
    """Checkpoints written before settings were stored typed (format cellpaint-rcic/1) recorded the
    parsed arguments: --load predicts from them as from the new format, and --resume continues them."""
    from cellpaint.engine.checkpoints import load_checkpoint

    state = torch.load(f"{trained}.0", weights_only=True)
    parsed = vars(main.build_parser().parse_args(["--data", str(tiny_competition[0]), "--save", str(trained),
                                                  "-e", "2", "--pl-epoch", "1", "--pl-size-func", "0.5",
                                                  "--cv-number", "0", *map(str, SMALL)]))
    old = {k: v for k, v in state.items() if k != "settings"}
    old.update(format="cellpaint-rcic/1", args={k: S.plain_value(v) for k, v in parsed.items()})
    torch.save(old, tmp_path / "old.0")
    assert main.saved_settings(load_checkpoint(tmp_path / "old.0"), "old.0").optim == \
        S.settings_from_dict(state["settings"]).optim
    for name in ("old.0", "new.0"):
        if name == "new.0":
            torch.save(state, tmp_path / name)
        assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / name, "--device", "cpu",
                   "--num-data-workers", 0) == 0
    assert (tmp_path / "old.0.output").read_bytes() == (tmp_path / "new.0.output").read_bytes()
    assert run("--data", tiny_competition[0], "--resume", tmp_path / "old.0", "--device", "cpu",
               "--num-data-workers", 0) == 0
    resumed, straight = (torch.load(p, weights_only=True) for p in (tmp_path / "old.1", f"{trained}.1"))
    assert resumed["format"] == "cellpaint-rcic/2" and resumed["pseudo_labels"] == straight["pseudo_labels"]
    assert all(torch.allclose(resumed["model"][k].float(), straight["model"][k].float(), atol=1e-6)
               for k in straight["model"])
