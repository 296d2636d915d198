"""Bad input, interruption and untrusted files: every failure is one clear line and loses nothing."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import main
from cellpaint.engine import checkpoints, epoch
from cellpaint.engine.data import load_data
from cellpaint.modes import check
from tests.conftest import ROOT, SMALL, run


def test_check_mode_accepts_sound_data(tiny_competition, capsys):
    assert run("--mode", "check", "--data", tiny_competition[0]) == 0
    assert "data set OK" in capsys.readouterr().out


def test_check_mode_lists_every_problem(tiny_competition, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(tiny_competition[0], data)
    plate = data / "train" / "HEPG2-01" / "Plate1"
    pngs = sorted(plate.glob("*_w1.png"))
    pngs[0].unlink()
    pngs[1].write_bytes(b"garbage")
    from PIL import Image
    Image.new("L", (10, 10)).save(pngs[2])
    Image.new("RGB", (24, 24)).save(pngs[3])
    train = pd.read_csv(data / "train.csv")
    train.loc[1, "sirna"] = 99
    train.loc[2, "sirna"] = train.loc[3, "sirna"] if train.loc[2, "plate"] == train.loc[3, "plate"] else 99
    train.to_csv(data / "train.csv", index=False)
    assert run("--mode", "check", "--data", data, "--classes", 11) == 1
    out = capsys.readouterr().out
    assert f"missing image: {pngs[0]}" in out
    assert f"corrupt image: {pngs[1]}" in out
    assert "of size 10x10 instead of 24x24" in out
    assert "not 8-bit single-channel (mode RGB)" in out
    assert "label 99 outside 0..10" in out
    problems = check.check_data(data, 11, images=False)
    assert set(problems) == {"labels"} and len(problems["labels"]) == 1 + (train.loc[2, "sirna"] != 99)
    # several decoding processes find the same problems, in the same order
    one = check.check_data(data, 11, workers=0)
    assert check.check_data(data, 11, workers=2) == one and len(one["images"]) == 4


def test_check_mode_metadata_errors(tmp_path, capsys):
    assert run("--mode", "check", "--data", tmp_path / "absent") == 1
    assert "does not exist" in capsys.readouterr().out


def test_missing_data_says_where_data_comes_from(tmp_path, caplog):
    assert run("--data", tmp_path / "absent", "--save", tmp_path / "x", *SMALL) == 1
    assert "python synthetic.py" in caplog.text and "Traceback" not in caplog.text
    assert not list(tmp_path.glob("x.*[0-9]"))


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        run("--data", tmp_path / "absent", "--save", tmp_path / "x", "--debug", *SMALL)


def test_unreadable_png_during_training_names_the_file(tiny_competition, tmp_path, caplog):
    data = tmp_path / "d"
    shutil.copytree(tiny_competition[0], data)
    bad = sorted((data / "train" / "HEPG2-01" / "Plate1").glob("*_s1_w4.png"))[0]
    bad.write_bytes(b"not a png")
    assert run("--data", data, "--save", tmp_path / "x", "-e", 1, "--cv-number", -1, *SMALL) == 1
    assert f"corrupt image: {bad}" in caplog.text


def test_checkpoint_for_another_class_count_is_refused(tiny_competition, tmp_path, caplog):
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": {}, "n_classes": 7, "args": {}}, tmp_path / "c")
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "c", *SMALL) == 1
    assert "predicts 7 classes but the data has 11" in caplog.text
    assert not (tmp_path / "c.output").exists()


def test_checkpoint_that_would_run_code_is_refused(tiny_competition, tmp_path, caplog):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model": Evil()}, tmp_path / "evil")
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "evil", *SMALL) == 1
    assert not marker.exists() and "not a readable checkpoint" in caplog.text


def test_non_finite_loss_stops_with_a_clear_error(tiny_competition, tmp_path, monkeypatch, caplog):
    real = epoch.training_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 22 else loss  # epoch 0 (22 batches) is fine, then it diverges
    monkeypatch.setattr(epoch, "training_loss", poisoned)
    save = tmp_path / "x"
    rc = run("--data", tiny_competition[0], "--save", save, "-e", 3, "--max-bad-steps", 3, "--cv-number", -1,
             *SMALL)
    assert rc == 1 and "not finite for 3 steps in a row" in caplog.text
    assert (tmp_path / "x.0").exists() and not (tmp_path / "x.1").exists()
    assert torch.load(tmp_path / "x.0", weights_only=True)["epoch"] == 0


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(trained, tiny_competition, tmp_path):
    """Kill a run in its second epoch; --resume finishes it with the uninterrupted run's weights."""
    save = tmp_path / "killed"
    argv = [sys.executable, str(ROOT / "main.py"), "--data", str(tiny_competition[0]), "--save", str(save),
            "-e", "2", "--pl-epoch", "1", "--pl-size-func", "0.5", "--cv-number", "0", *SMALL, "--disp-batches", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed.log"
    try:
        deadline = time.time() + 600
        # kill once the log shows a batch of epoch 1 done: mid-epoch, after pseudo-labelling
        while proc.poll() is None and time.time() < deadline and not (
                log.exists() and "epoch 1 batch 2/" in log.read_text()):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed.1").exists()
    state = torch.load(tmp_path / "killed.0", weights_only=True)  # intact
    assert state["epoch"] == 0
    assert run("--data", tiny_competition[0], "--resume", tmp_path / "killed.0", "-e", 2, "--pl-epoch", 1,
               "--pl-size-func", "0.5", "--cv-number", 0, *SMALL) == 0
    a = torch.load(f"{trained}.1", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed.1", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_skip_bad_images_covers_validation_pseudo_labels_and_prediction(tiny_competition, tmp_path, caplog):
    """With --skip-bad-images an unreadable val/test site is left out of validation, pseudo-labelling and
    prediction instead of stopping a long run; a test well with no readable site still gets a row."""
    import make_submission
    from cellpaint.data.prediction_file import load_predictions

    data = tmp_path / "d"
    shutil.copytree(tiny_competition[0], data)
    subsets = load_data(main.parse_settings(["--data", str(data), "--save", str(tmp_path / "x"), *SMALL]).data).subsets
    val_site = subsets["val"]["image_prefix"].iat[0]
    test_well = subsets["test"]["id_code"].iat[0]
    test_sites = subsets["test"].loc[subsets["test"]["id_code"] == test_well, "image_prefix"]
    for prefix in [val_site, *test_sites]:
        with open(f"{prefix}_w2.png", "r+b") as f:
            f.truncate(40)  # a corrupt PNG
    save = tmp_path / "net"
    argv = ["--data", data, *SMALL, "--skip-bad-images"]
    # without the flag the run stops at the first inference, naming the file
    assert run(*argv[:-1], "--save", tmp_path / "stops", "-e", 1) == 1
    assert "corrupt image:" in caplog.text
    caplog.clear()
    assert run(*argv, "--save", save, "-e", 2, "--pl-epoch", 1, "--pl-size-func", "0.5") == 0
    assert f"skipping site {val_site}" in caplog.text and "site(s) with unreadable images skipped" in caplog.text
    assert run(*argv, "--mode", "predict", "--load", f"{save}.1") == 0
    assert f"1 test well(s) without a readable image get an all-zero logits vector (e.g. {test_well})" in caplog.text
    pred = load_predictions(f"{save}.1.output")
    assert set(pred["test"]) == set(subsets["test"]["id_code"])
    assert len(pred["test"][test_well]) == 1 and not pred["test"][test_well][0].any()
    val_well = subsets["val"]["id_code"].iat[0]
    assert len(pred["val"][val_well]) == len(subsets["val"].query("id_code == @val_well")) - 1
    assert make_submission.main(["--data", str(data), "-o", str(tmp_path / "sub.csv"), f"{save}.1.output"]) == 0
    assert len(pd.read_csv(tmp_path / "sub.csv")) == subsets["test"]["id_code"].nunique()
