"""Every setting a run writes down reads back as itself: through a checkpoint (what --resume
restores) and through `<save>.args.json` (the typed settings as text). The schedules' text forms
(multi-span --lr, --pl-size-func, --lr-groups) are checked to be fixed points of parse -> text."""
from __future__ import annotations

import json

import pytest

import main
from cellpaint.cli import flags
from cellpaint.core import settings as S
from cellpaint.core.schedule import LRGroups, LRSchedule, SizeFunction
from cellpaint.engine.checkpoints import CHECKPOINT_FORMAT, save_checkpoint

# a value other than the default for every flag a checkpoint records (valid together)
EVERY_FLAG = [
    "--backbone", "resnet18", "--pretrained", "none", "--head-hidden", "64,32", "--head", "neck",
    "--concat-cell-type", "false", "--metric-loss-coeff", "0.35", "--loss", "bce", "--loss-classes", "treatment",
    "--embedding-size", "48", "--bn-mom", "0.125", "--classes", "77", "--stem-init", "rgb-tile",
    "--epochs", "31", "--batch-size", "12", "--gradient-accumulation", "3", "--accumulation-mode", "mean",
    "--lr", "cosine,1.234567891e-4,7,6.5e-5,19.5,3.3333333333e-6", "--backbone-lr-mult", "0.3",
    "--lr-groups", "conv0, norm0=1/3,denseblock=0.5", "--finetune-cell-type", "HUVEC", "--wd", "3e-4",
    "--label-smoothing", "0.05", "--mixup", "0.4", "--cutmix", "0.7", "--mix-partners", "separate",
    "--pw-aug", "0.2,0.15", "--scale-aug", "0.6", "--zoom-interpolation", "bilinear", "--rotate-aug", "12.5",
    "--brightness-aug", "0.1", "--contrast-aug", "0.2", "--flips", "hv", "--aug-prob", "0.5",
    "--rescale-aug", "0.1", "--rotate-border", "reflect-101", "--brightness-contrast-space", "raw",
    "--gamma-range", "0.8,1.2", "--fp16", "false", "--precision", "bf16", "--seed", "123",
    "--start-epoch", "2", "--max-bad-steps", "7", "--disp-batches", "9", "--pl-epoch", "20",
    "--pl-size-func", "min(1, 0.6*x + 0.4)", "--pl-duplicates", "refill", "--data", "some/data",
    "--folds", "5", "--val-unit", "well", "--val-experiments", "HUVEC-01,RPE-02", "--data-split-seed", "4",
    "--data-normalization", "experiment", "--all-controls-train", "false", "--train-controls", "false",
    "--use-layout-leak", "false", "--cache-dir", "stats/here", "--num-data-workers", "3",
    "--image-cache", "cache/images", "--skip-bad-images", "--tta", "4",
    "--tta-size", "0.875", "--pred-suffix", ".x", "--save-embeddings", "--channels-last", "true",
    "--compile", "--sync-bn", "--device", "cpu", "--threads", "2", "--bottleneck-bn", "once", "--overwrite",
    "--model-ema", "0.999", "--image-size-schedule", "12:0,16:5", "--batch-sampling", "plate", "--adabn", "plate",
    "--inference-weights", "raw", "--split", "folds", "--normalise", "tvn", "--evaluate", "map",
]
# settings EVERY_FLAG leaves at their default on purpose: excluded by others (or by the run's mode;
# --flips hv keeps the flips on and only drops the transposes; --head plain would refuse the hidden
# layers and the ArcFace weight; --resume is given per test)
AT_DEFAULT = {"augment.flips", "augment.gamma", "data.cv_number", "data.val_last_experiment",
              "inference.tta_random", "model.head", "run.mode", "run.resume"}


def every_setting(*argv: str) -> S.Settings:
    """The settings of the command line, as parsed (no checkpoint is read)."""
    return flags.complete(flags.settings_from_args(main.build_parser().parse_args([*argv, *EVERY_FLAG])))


def leaves(settings: S.Settings) -> dict[str, object]:
    """group.field -> its plain value (what a checkpoint and SAVE.args.json store)."""
    out = {}
    for group, values in S.settings_dict(settings).items():
        out.update({f"{group}.{k}": v for k, v in values.items()} if isinstance(values, dict) else {group: values})
    return out


def test_every_setting_is_set_away_from_its_default():
    """The list above must keep covering every setting (a new flag is added to it)."""
    given = leaves(every_setting("--save", "x", "--load", "y"))
    default = leaves(flags.complete(flags.settings_from_args(main.build_parser().parse_args([]))))
    assert given.keys() == default.keys()
    assert {k for k in given if given[k] == default[k]} == AT_DEFAULT
    assert flags.problems(every_setting("--save", "x")) is None  # a run could start with them


def test_a_checkpoint_restores_every_setting_as_the_same_typed_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --data some/data is stored absolute (issue 21): under tmp_path, and there
    (tmp_path / "some" / "data").mkdir(parents=True)
    original = every_setting("--save", str(tmp_path / "net"), "--load", str(tmp_path / "parent.9"))
    ckpt = tmp_path / "net.3"
    save_checkpoint(str(ckpt), {"format": CHECKPOINT_FORMAT, "epoch": 3, "optimizer": {},
                                "settings": S.settings_dict(original)})
    restored = main.parse_settings(["--resume", str(ckpt)])
    for group in ("data", "model", "optim", "augment", "pseudo", "inference", "seed"):
        assert getattr(restored, group) == getattr(original, group), group
    # the values come back with their own types, not as JSON's lists and floats
    assert restored.augment.gamma_range == (0.8, 1.2) and restored.model.head_hidden == (64, 32)
    assert restored.data.val_experiments == ("HUVEC-01", "RPE-02")
    assert str(restored.optim.lr) == str(original.optim.lr) and restored.optim.lr(10, 31) == original.optim.lr(10, 31)
    assert restored.pseudo.size_func.text == "min(1, 0.6*x + 0.4)"
    assert restored.run.save == str(tmp_path / "net")  # from the --resume path, as documented


def test_the_settings_file_reads_back_as_the_typed_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = every_setting("--save", str(tmp_path / "net"))
    S.save_settings(str(tmp_path / "net.args.json"), settings)
    written = json.loads((tmp_path / "net.args.json").read_text())
    written.pop("run_id", None)
    assert S.settings_from_dict(written) == settings
    assert LRSchedule.parse(written["optim"]["lr"]) == settings.optim.lr
    assert LRGroups.parse(written["optim"]["lr_groups"]) == settings.optim.lr_groups
    assert SizeFunction(written["pseudo"]["size_func"]).text == settings.pseudo.size_func.text
    assert written["augment"]["gamma_range"] == [0.8, 1.2] and written["model"]["head_hidden"] == [64, 32]
    assert written["data"]["root"] == str(tmp_path / "some" / "data") and written["data"]["val_experiments"] == ["HUVEC-01", "RPE-02"]


@pytest.mark.parametrize("text, shown", [
    ("cosine,1.5e-4,90,6e-5,150,0", "cosine,0.00015,90,6e-05,150,0"),  # the 1st place's, three spans
    ("const,1e-3,2,1e-4", "const,0.001,2,0.0001"),
    ("cosine, 3e-3", "cosine,0.003"),
    ("const,0.1,2.5,0.01,7.25,0.001,9,0", "const,0.1,2.5,0.01,7.25,0.001,9,0"),
    # more digits than %g keeps: still read back exactly (a resumed run must not change its rate)
    ("cosine,1.234567891e-4,1234567,3.3333333333e-6", "cosine,0.0001234567891,1234567.0,3.3333333333e-06"),
])
def test_lr_schedule_text_reads_back_as_itself(text, shown):
    schedule = LRSchedule.parse(text)
    assert str(schedule) == shown
    assert LRSchedule.parse(str(schedule)) == schedule
    assert len(schedule.values) == len(schedule.bounds) + 1


def test_lr_groups_and_size_function_keep_their_text():
    groups = LRGroups.parse("conv0, norm0=1/3,denseblock,transition=0.5, norm5=0")
    assert groups.text == "conv0, norm0=1/3,denseblock,transition=0.5, norm5=0"
    assert groups.groups == ((("conv0", "norm0"), 1 / 3), (("denseblock", "transition"), 0.5), (("norm5",), 0.0))
    assert LRGroups.parse(groups.text) == groups
    f = SizeFunction(" 0.6*x+0.4 ")
    assert f.text == " 0.6*x+0.4 " and SizeFunction(f.text)(0.5) == f(0.5) == pytest.approx(0.7)
