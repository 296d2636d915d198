"""What a newcomer meets (issue 21): the recipes tried small, the 41st recipe's untrained outputs,
runs that travel, val and predict on the split a checkpoint was trained with, progress and
curves while a run runs, help that helps, and images too small for a backbone."""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

import main
import model as M
import make_submission
from cellpaint.cli.flag_types import HelpFormatter
from cellpaint.core import progress
from cellpaint.data import metadata, pixel_stats
from cellpaint.data.prediction_file import MASKED_LOGIT, load_predictions
from cellpaint.data.structure import derive_structure
from cellpaint.engine.epoch import correct_predictions
from cellpaint.engine.inference import validation_loss
from cellpaint.engine.setup import make_optimizer
from cellpaint.modes import curves as modes_curves
from cellpaint.modes import train as train_mode
from cellpaint.data.synthetic import generate
from cellpaint.data.synthetic_config import SyntheticConfig
from tests.conftest import ROOT, SMALL, TINY, run

# the recipes' network swapped for the small one: the only change a recipe needs to run on a CPU
SMALLER = ["--backbone", "smallcnn", "--pretrained", "none"]
EXEC = ["--device", "cpu", "--num-data-workers", "0"]  # where it runs, not what it computes


def _log_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> tuple[Path, dict]:
    """The tests' tiny set with a few more train experiments, so that every recipe's defaults (batch 24,
    two batches a step; treatment wells only, less each cell type's last experiment) make a step."""
    out = tmp_path_factory.mktemp("recipe_data")
    config = SyntheticConfig(layout="competition", **{**TINY, "train_experiments": (3, 3, 2, 2)})
    return out, generate(out, config, progress=False)


@pytest.fixture(scope="module")
def forty_first(recipe_data, tmp_path_factory) -> Path:
    """@recipes/41st-place-train.args for 2 epochs with the small network, nothing else changed
    (its --lr-groups name the stem as STEM, which the small CNN has too)."""
    save = tmp_path_factory.mktemp("r41") / "net"
    with contextlib.chdir(ROOT):  # the recipe's nested @files are relative to the working directory
        rc = run("@recipes/41st-place-train.args", "--data", recipe_data[0], "--save", save, "-e", 2,
                 *SMALLER, *EXEC)
    assert rc == 0
    return save


# ----------------------------------------------------------------- 2. every recipe, tried small


RECIPES_RUN_HERE = {"1st-place.args", "41st-place-common.args", "41st-place-train.args",
                    "41st-place-finetune.args", "41st-place-predict.args", "wilds-standard.args",
                    "wilds-transductive.args"}


def test_every_recipe_file_is_run_small_here():
    assert {p.name for p in (ROOT / "recipes").glob("*.args")} == RECIPES_RUN_HERE


def test_first_place_recipe_runs_small_and_predicts_as_the_readme_says(recipe_data, tmp_path, monkeypatch,
                                                                      caplog):
    monkeypatch.chdir(ROOT)
    save = tmp_path / "dn161_0"
    with caplog.at_level("INFO", logger="cellpaint"):
        assert run("@recipes/1st-place.args", "--data", recipe_data[0], "--save", save, "-e", 2,
                   *SMALLER, *EXEC) == 0
    # its pseudo-labels start at epoch 90: allowed, and said
    assert "--pl-epoch 90 is not below --epochs 2: no pseudo-labels in this run" in _log_of(caplog)
    assert pd.read_csv(f"{save}.metrics.csv")["pseudo_labels"].tolist() == [0, 0]
    assert run("--mode", "predict", "--data", recipe_data[0], "--load", f"{save}.1", "--tta", 8, *EXEC) == 0
    output = load_predictions(f"{save}.1.output")
    assert output["val"] == {} and len(output["test"]) > 0  # --cv-number -1 held nothing out: no 'val' part


def test_41st_recipes_run_small(forty_first, recipe_data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = recipe_data[0]
    assert Path(f"{forty_first}.1").is_file()
    tuned = tmp_path / "huvec"
    assert run("@recipes/41st-place-finetune.args", "--data", data, "--load", f"{forty_first}.1",
               "--finetune-cell-type", "HUVEC", "--save", tuned, "-e", 2, *SMALLER, *EXEC) == 0
    assert run("@recipes/41st-place-predict.args", "--data", data, "--load", f"{tuned}.1",
               "--finetune-cell-type", "HUVEC", *SMALLER, *EXEC) == 0
    embeddings = load_predictions(f"{tuned}.1.embeddings", kind="embeddings")
    assert all(code.startswith("HUVEC") for part in embeddings.values() for code in part)
    assert run("@recipes/41st-place-common.args", "--data", data, "--save", tmp_path / "common", "-e", 2,
               *SMALLER, *EXEC) == 0


@pytest.mark.parametrize("recipe", ["wilds-standard.args", "wilds-transductive.args"])
def test_wilds_recipes_run_small(recipe, tmp_path, monkeypatch):
    data = tmp_path / "wilds"
    generate(data, SyntheticConfig(**{**TINY, "layout": "wilds", "val_experiments": (1, 1, 1, 1),
                                      "pixel_stats": False}), progress=False)
    monkeypatch.chdir(ROOT)
    save = tmp_path / "net"
    assert run(f"@recipes/{recipe}", "--data", data, "--save", save, "-e", 2, *SMALLER, *EXEC) == 0
    assert len(pd.read_csv(f"{save}.metrics.csv")) == 2


def test_recipe_flags_are_checked_before_the_pixel_statistics(recipe_data, tmp_path, monkeypatch, capsys):
    def computed(*args, **kwargs):
        raise AssertionError("pixel statistics read before the flags were checked")

    monkeypatch.setattr(pixel_stats, "load_pixel_stats", computed)
    monkeypatch.chdir(ROOT)
    # a DenseNet's parameter names typed for the small network: refused before any statistics
    rc = run("@recipes/41st-place-train.args", "--data", recipe_data[0], "--save", tmp_path / "x", "-e", 2,
             *SMALLER, "--lr-groups", "conv0,norm0=1/3", *EXEC)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert "--lr-groups: no backbone parameter name starts with 'conv0'" in err[-1] and "--lr-groups none" in err[-1]


def test_lr_groups_none_clears_a_recipes_groups(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main.parse_settings(["@recipes/41st-place-train.args", "--save", "x"]).optim.lr_groups is not None
    assert main.parse_settings(["@recipes/41st-place-train.args", "--save", "x", "--lr-groups", "none"]
                               ).optim.lr_groups is None


def _groups(net, *argv) -> list[tuple[float, list[int]]]:
    opt = make_optimizer(main.parse_settings(["--save", "x", "--lr", "const,1e-3", *argv]).optim, net)
    return [(g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups]


def test_recipe_stem_groups_are_the_41st_place_groups_on_densenet201(monkeypatch):
    monkeypatch.chdir(ROOT)
    net = M.CellClassifier("densenet201", 11, 4, pretrained="none", embedding_size=16, concat_cell_type=False,
                           head="plain", in_channels=6)
    theirs = _groups(net, "--lr-groups", "conv0,norm0=1/3,denseblock,transition,norm5=1/2")
    ours = _groups(net, "@recipes/41st-place-train.args")  # its own --lr (const,1e-3) and groups
    # the same parameters, in the same order, at the same rates (only the groups' names differ)
    assert ours == theirs
    assert ours[0][0] == pytest.approx(1e-3 / 3) and ours[1][0] == 5e-4 and len(ours) == 3


def test_stem_names_the_small_networks_stem():
    net = M.CellClassifier("smallcnn", 11, 4, pretrained="none", embedding_size=16, concat_cell_type=False,
                           head="plain", in_channels=6)
    (stem_lr, stem), (rest_lr, rest), (head_lr, _) = _groups(net, "--lr-groups", "STEM=1/3",
                                                            "--backbone-lr-mult", "0.5")
    first_conv, first_norm = net.backbone[0], net.backbone[1]
    assert stem == [id(first_conv.weight), id(first_norm.weight), id(first_norm.bias)]
    assert (stem_lr, rest_lr, head_lr) == (pytest.approx(1e-3 / 3), 5e-4, 1e-3)
    assert len(stem) + len(rest) == len(list(net.backbone.parameters()))


# --------------------------------------------------------- 1. outputs the loss never trains


def test_train_accuracy_ignores_outputs_the_loss_does_not_train():
    logits = torch.tensor([[0.1, 0.9, 5.0], [0.8, 0.2, 7.0], [0.3, 0.1, 9.0]])  # class 2 (a control) always largest
    target = F.one_hot(torch.tensor([1, 0, 1]), 3).float()
    assert correct_predictions(logits, target) == 0  # over every output: the untrained one wins each time
    assert correct_predictions(logits, target, torch.tensor([0, 1])) == 2


def test_41st_prediction_file_never_picks_an_untrained_class(forty_first, recipe_data, tmp_path, caplog):
    data = recipe_data[0]
    with caplog.at_level("INFO", logger="cellpaint"):
        assert run("--mode", "predict", "--data", data, "--load", f"{forty_first}.1", *EXEC) == 0
    note = next(m for m in _log_of(caplog).splitlines() if "as it was trained" in m)
    for taken in ("--loss-classes treatment", "--val-last-experiment", "--train-controls false",
                  "--use-layout-leak false"):
        assert taken in note
    # the same network with every output written as it comes: only the untrained columns differ
    assert run("--mode", "predict", "--data", data, "--load", f"{forty_first}.1", "--loss-classes", "all",
               "--pred-suffix", "_raw", *EXEC) == 0
    masked, raw = load_predictions(f"{forty_first}.1.output"), load_predictions(f"{forty_first}.1.output_raw")
    structure = derive_structure(metadata.load_table(data))
    treatment, controls = structure.treatment_classes, structure.control_classes
    for part in ("val", "test"):
        assert masked[part].keys() == raw[part].keys() and masked[part]
        for code, sites in masked[part].items():
            for site, plain in zip(sites, raw[part][code]):
                assert (site[controls] == np.float32(MASKED_LOGIT)).all()
                assert np.array_equal(site[treatment], plain[treatment])
                assert site.argmax() in treatment
                assert (plain[controls] != np.float32(MASKED_LOGIT)).all()
    # its split came from the checkpoint: the last train experiment of each cell type is validation
    assert {code.rsplit("_", 2)[0] for code in masked["val"]} == {"HEPG2-03", "HUVEC-03", "RPE-02", "U2OS-02"}
    assert run("--mode", "val", "--data", data, "--load", f"{forty_first}.1", *EXEC) == 0
    assert make_submission.main(["--data", str(data), "-o", str(tmp_path / "sub.csv"), f"{forty_first}.1.output"]) == 0


# --------------------------------------------------------------------------- 3. runs travel


def test_a_run_resumes_from_another_folder_and_names_the_flag_when_its_data_moved(
        tiny_competition, tmp_path, monkeypatch, capsys):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    shutil.copytree(tiny_competition[0], here / "data")
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    assert run("--data", "data", "--save", "run/net", "-e", 2, *SMALL) == 0  # relative paths, as typed
    recorded = torch.load(here / "run" / "net.0", weights_only=True)["settings"]
    assert recorded["data"]["root"] == str(here / "data") and recorded["run"]["save"] == str(here / "run" / "net")
    assert '"root": "' + str(here / "data") in (here / "run" / "net.args.json").read_text()
    net0, net1 = here / "run" / "net.0", here / "run" / "net.1"
    net1.unlink()  # as if stopped after epoch 0
    monkeypatch.chdir(elsewhere)
    assert run("--resume", net0, *EXEC) == 0 and net1.is_file()
    (here / "data").rename(here / "moved")
    net1.unlink()
    first = net0.read_bytes()
    capsys.readouterr()
    assert run("--resume", net0, *EXEC) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(here / "data") in err[0] and "give --data DIR" in err[0]
    assert net0.read_bytes() == first and not net1.exists()  # nothing written, nothing lost
    assert run("--resume", here / "run" / "net.0", "--data", here / "moved", *EXEC) == 0


# ------------------------------------------------------ 4. the split a checkpoint was trained with


@pytest.fixture(scope="module")
def on_everything(tiny_competition, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("all") / "net"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--cv-number", -1, *SMALL) == 0
    return Path(f"{save}.0")


def test_val_of_a_checkpoint_trained_on_everything(on_everything, tiny_competition, capsys, caplog):
    data = tiny_competition[0]
    assert run("--mode", "val", "--data", data, "--load", on_everything, *EXEC) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no validation experiments: --cv-number -1" in err and "holds none out" in err
    with caplog.at_level("INFO", logger="cellpaint"):
        assert run("--mode", "val", "--data", data, "--load", on_everything, "--cv-number", 0, *EXEC) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("was trained on" in w and "made with --cv-number -1" in w and "not held out" in w for w in warned)


def test_predict_uses_the_checkpoint_split_and_says_so(on_everything, tiny_competition, caplog):
    with caplog.at_level("INFO", logger="cellpaint"):
        assert run("--mode", "predict", "--data", tiny_competition[0], "--load", on_everything, *EXEC) == 0
    assert "as it was trained, --cv-number -1" in _log_of(caplog)
    assert load_predictions(f"{on_everything}.output")["val"] == {}


def test_a_held_out_checkpoint_warns_of_nothing(trained, tiny_competition, caplog):
    with caplog.at_level("INFO", logger="cellpaint"):
        assert run("--mode", "val", "--data", tiny_competition[0], "--load", f"{trained}.1", *EXEC) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "as it was trained" not in _log_of(caplog)  # the default split is the one it was trained with


# ------------------------------------------------------------ 6. a run shows itself while it runs


def test_curves_redrawn_each_epoch_never_failing_the_run_and_progress_logged(tiny_competition, tmp_path,
                                                                             monkeypatch, caplog):
    calls = []

    def plot(metrics_csv, out_png, quiet=False):
        calls.append((len(pd.read_csv(metrics_csv)), quiet))
        if len(calls) == 1:
            raise ValueError("a picture that cannot be drawn")
        return True

    monkeypatch.setattr(train_mode, "plot_training_curves", plot)
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)  # a line at every batch
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    save = tmp_path / "net"
    with caplog.at_level("INFO", logger="cellpaint"):
        assert run("--data", tiny_competition[0], "--save", save, "-e", 2, *SMALL, "--disp-batches", 1000) == 0
    assert calls == [(1, True), (2, True), (2, False)]  # after each epoch, then once more, reporting
    log = _log_of(caplog)
    assert "training curves not drawn: ValueError: a picture that cannot be drawn" in log
    assert "epoch 0 batch 1/" in log  # training: a line although --disp-batches is never reached
    assert re.search(r"inference: (\d+)/\1 sites \(100%\), .* about 0 s left", log)  # the last batch's line
    history = pd.read_csv(f"{save}.metrics.csv")
    assert np.isfinite(history["val_loss"]).all() and (history["val_loss"] > 0).all()


def test_heartbeat_is_quiet_on_a_terminal(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)
    logger = logging.getLogger("cellpaint")
    with caplog.at_level("INFO", logger="cellpaint"):
        monkeypatch.setattr(progress, "on_terminal", lambda: True)
        progress.Heartbeat(logger, "inference", 10).beat(3)
        assert not caplog.records  # tqdm's bar shows it there
        monkeypatch.setattr(progress, "on_terminal", lambda: False)
        progress.Heartbeat(logger, "inference", 10).beat(3)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["inference: 3/10 batches (30%)"]


def test_validation_loss_is_the_loss_on_the_treatment_classes():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    labels = np.array([0, 2, 1, 2, 0, 1])
    treatment = np.array([0, 1, 2])  # classes 3 and 4: controls, left out
    want_ce = F.cross_entropy(logits[:, :3], torch.as_tensor(labels))
    assert validation_loss(logits.numpy(), labels, treatment, "ce") == pytest.approx(float(want_ce), rel=1e-6)
    want_bce = F.binary_cross_entropy_with_logits(logits[:, :3], F.one_hot(torch.as_tensor(labels), 3).float())
    assert validation_loss(logits.numpy(), labels, treatment, "bce") == pytest.approx(float(want_bce), rel=1e-6)


def test_curves_picture_shows_validation_loss_whole_epochs_and_an_uncovered_best_note():
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    history = pd.DataFrame({"epoch": [0, 1], "train_loss": [3.0, 2.0], "val_loss": [2.5, 2.2],
                            "train_acc": [0.1, 0.5], "acc": [0.2, 0.9], "acc_HEPG2": [0.2, 0.8],
                            "acc_HUVEC": [0.3, 0.95], "lr": [1e-3, 5e-4], "pseudo_labels": [0, 0]})
    fig = modes_curves.draw(history)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax_loss, ax_acc, ax_lr, ax_pl = fig.axes
    assert [line.get_label() for line in ax_loss.get_lines()] == ["train", "validation (treatment classes)"]
    low, high = ax_pl.get_xlim()
    assert all(t == int(t) for t in ax_pl.get_xticks() if low <= t <= high)
    renderer = canvas.get_renderer()
    legend = ax_acc.get_legend().get_window_extent(renderer)
    note = next(t for t in ax_acc.texts if t.get_text().startswith("best")).get_window_extent(renderer)
    assert not legend.overlaps(note) and legend.x0 >= ax_acc.get_window_extent(renderer).x1


# ---------------------------------------------------------------------------- 7. help that helps


def test_help_shows_every_default():
    parser = main.build_parser()
    formatter = HelpFormatter("main.py")
    for action in parser._actions:  # the command line's own parser
        if not action.option_strings or action.nargs == 0 or action.default in (None, ""):
            continue
        assert action.help, f"{action.option_strings} has no help: argparse would hide its default"
        assert "default" in formatter._get_help_string(action), action.option_strings
    text = " ".join(parser.format_help().split())  # the lines as wrapped, joined
    for shown in ("(default: ../data)", "(default: 90)", "(default: 24)", "(default: cosine,0.00015)",
                  "(default: 0.1,0.1)", "(default: true)"):
        assert shown in text
    assert "(default: 1)" in text.split("--tta TTA ")[1].split("--tta-size")[0]


def test_check_mode_says_what_it_checked(tiny_competition, capsys):
    assert run("--mode", "check", "--data", tiny_competition[0], "--num-data-workers", 0) == 0
    out = capsys.readouterr().out.strip().splitlines()
    text = "\n".join(out)
    assert out[-1] == "data set OK"
    assert "train 6 experiments, 24 plates," in text and "test 4 experiments, 16 plates," in text
    assert "classes: 11 (8 treatment in 4 plate groups, 3 control)" in text
    table = metadata.load_table(tiny_competition[0])
    assert f"images: {len(table) * 6} PNGs decoded (6 channels a site): {len(table) * 6} of 24x24" in text
    assert "layout coincidences: test " in text and "shifted by" in text


@pytest.mark.parametrize("tool", ["curves", "merge_predictions", "show"])
def test_tools_name_themselves_in_their_help(tool):
    proc = subprocess.run([sys.executable, "-m", f"tools.{tool}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m tools.{tool} ")


# ------------------------------------------------------------------- 8. images too small for a backbone


def test_images_too_small_for_the_backbone_are_one_line_before_any_statistics(tiny_competition, tmp_path,
                                                                              monkeypatch, capsys):
    pytest.importorskip("timm")

    def computed(*args, **kwargs):
        raise AssertionError("pixel statistics read before the backbone was checked")

    monkeypatch.setattr(pixel_stats, "load_pixel_stats", computed)
    rc = run("--data", tiny_competition[0], "--save", tmp_path / "x", "-e", 1, "--backbone", "timm-convnext_atto",
             "--pretrained", "none", "--data-normalization", "global", *EXEC)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert "ERROR: --backbone timm-convnext_atto cannot take 24x24 images" in err[-1]  # setup.py::check_input_sizes
