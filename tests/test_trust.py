"""Runs that remember, refuse and explain (issue 13): a checkpoint carries its run, a run owns its
--save, and every failure is one line with a non-zero exit status that loses nothing written before."""
from __future__ import annotations

import shutil

import pytest
import torch

import main
from check import check_data
import runconfig
from synthetic import SyntheticConfig, generate
from tests.conftest import TINY, run

# what a user types to run somewhere: no setting of the model or of the run itself
WHERE = ["--device", "cpu", "--num-data-workers", "0"]


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Another data set with the same class count (another seed): a checkpoint must tell it apart."""
    out = tmp_path_factory.mktemp("other")
    generate(out, SyntheticConfig(layout="competition", **{**TINY, "seed": 4}), progress=False)
    return out


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------- 4. --resume restores, --load takes the architecture


def test_resume_restores_the_saved_settings(trained, tiny_competition, tmp_path):
    """Only --resume (and where to run): epochs, schedule, seed, pseudo-labels, backbone come from the checkpoint."""
    shutil.copy(f"{trained}.0", tmp_path / "again.0")
    assert run("--data", tiny_competition[0], "--resume", tmp_path / "again.0", *WHERE) == 0
    a = torch.load(f"{trained}.1", weights_only=True)
    b = torch.load(tmp_path / "again.1", weights_only=True)
    assert a["pseudo_labels"] == b["pseudo_labels"] and b["args"]["epochs"] == 2 and b["args"]["seed"] == 5
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
    assert not (tmp_path / "again.2").exists()  # 2 epochs as saved, not the default 90


@pytest.mark.parametrize("flag, value, saved", [("-e", 5, "--epochs 2"), ("--seed", 1, "--seed 5"),
                                                ("--backbone", "resnet18", "--backbone smallcnn"),
                                                ("--lr", "const,1e-3", "--lr cosine,0.00015")])
def test_resume_refuses_a_flag_that_contradicts_the_checkpoint(trained, tiny_competition, tmp_path, capsys,
                                                              flag, value, saved):
    shutil.copy(f"{trained}.0", tmp_path / "again.0")
    before = (tmp_path / "again.0").read_bytes()
    assert run("--data", tiny_competition[0], "--resume", tmp_path / "again.0", flag, value, *WHERE) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"contradicts --resume {tmp_path / 'again.0'}, which was run with {saved}" in line
    assert (tmp_path / "again.0").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.0"]  # no log, no checkpoint


def test_resume_help_lists_the_flags_that_may_change(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for dest in runconfig.MAY_CHANGE:
        assert runconfig.flag_name(dest) in text


def test_fine_tune_command_works_without_the_architecture_flags(trained, tiny_competition, tmp_path, capsys):
    """The README's fine-tune command as written: the architecture comes from --load, in every mode."""
    save = tmp_path / "ft"
    assert run("--data", tiny_competition[0], "--load", trained, "--finetune-cell-type", "HEPG2", "--start-epoch", 0,
               "-e", 1, "--save", save, "-b", 16, *WHERE) == 0
    assert torch.load(f"{save}.0", weights_only=True)["args"]["backbone"] == "smallcnn"
    assert run("--mode", "val", "--data", tiny_competition[0], "--load", f"{save}.0", *WHERE) == 0
    assert "'backbone': 'smallcnn'" in capsys.readouterr().err  # the logged arguments are the checkpoint's
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", f"{save}.0", "--backbone", "resnet18",
               *WHERE) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"ERROR: --backbone resnet18 contradicts --load {save}.0, which was made with --backbone "
                    "smallcnn; leave the flag out: --load takes the architecture from the checkpoint")
    assert not (tmp_path / "ft.0.output").exists()


# ------------------------------------------------------------------------------ 3. another data set


def test_resume_on_another_data_set_is_refused_and_load_names_it(trained, other_data, tmp_path, caplog):
    shutil.copy(f"{trained}.0", tmp_path / "again.0")
    before = (tmp_path / "again.0").read_bytes()
    assert run("--data", other_data, "--resume", tmp_path / "again.0", *WHERE) == 1
    assert "was trained on another data set" in caplog.text and f"than --data {other_data}" in caplog.text
    assert (tmp_path / "again.0").read_bytes() == before and not (tmp_path / "again.1").exists()
    caplog.clear()
    assert run("--mode", "val", "--data", other_data, "--load", f"{trained}.0", *WHERE) == 0
    assert f"--load {trained}.0 was trained on another data set" in caplog.text


# ------------------------------------------------------------------- 1. strict integers, derived structure


def copy_data(tiny_competition, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(tiny_competition[0], data)
    return data


@pytest.mark.parametrize("name, column, value", [("train.csv", "sirna", 3.7), ("train.csv", "plate", 1.9),
                                                 ("test_controls.csv", "sirna", "x")])
def test_a_decimal_label_or_plate_is_refused_with_its_line(tiny_competition, tmp_path, capsys, caplog,
                                                           name, column, value):
    data = copy_data(tiny_competition, tmp_path)
    lines = (data / name).read_text().splitlines()
    header = lines[0].split(",")
    row = lines[3].split(",")
    row[header.index(column)] = str(value)
    lines[3] = ",".join(row)
    (data / name).write_text("\n".join(lines) + "\n")
    bad_png = sorted((data / "train" / "HEPG2-01" / "Plate1").glob("*_w2.png"))[0]
    bad_png.write_bytes(b"")
    assert run("--mode", "check", "--data", data, "--num-data-workers", 0) == 1
    out = capsys.readouterr().out
    message = f"{data / name} line 4, column {column}: '{value}' is not an integer"
    assert message in out and "data set OK" not in out
    assert f"corrupt image: {bad_png}" in out  # the images are checked after a metadata problem too
    assert run("--data", data, "--save", tmp_path / "x", "-e", 1, *WHERE) == 1
    assert message in caplog.text and not list(tmp_path.glob("x.*[0-9]"))


def test_a_label_far_beyond_the_others_is_refused(tiny_competition, tmp_path, capsys, caplog):
    data = copy_data(tiny_competition, tmp_path)
    train = (data / "train.csv").read_text().splitlines()
    row = train[5].split(",")
    row[-1] = "999"
    train[5] = ",".join(row)
    (data / "train.csv").write_text("\n".join(train) + "\n")
    assert run("--mode", "check", "--data", data, "--num-data-workers", 0) == 1
    message = f"labels leave 988 class(es) without any well (11..998): is label 999 of train well {row[0]} a typo?"
    assert message in capsys.readouterr().out
    assert run("--data", data, "--save", tmp_path / "x", "-e", 1, *WHERE) == 1
    assert message in caplog.text and not list(tmp_path.glob("x.*[0-9]"))
    # a user who means it says so
    assert "labels leave" not in str(check_data(data, 1000, images=False))
