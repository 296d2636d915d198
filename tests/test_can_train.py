"""The data can train, and nothing is silent (issue 20): a run that cannot train, predict or submit is
refused at its start in one line naming the flag, file or line; the stragglers that were tracebacks
or blamed the wrong thing. Each case: the exit status, the one line, and what was there before intact."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
import make_submission
from cellpaint.core import atomic
from cellpaint.data import metadata
from cellpaint.data.prediction_file import load_predictions, save_embeddings, save_predictions
from cellpaint.engine.data import load_data
from tests.conftest import ROOT, SMALL, run
from tests.test_submission import make

WHERE = ["--device", "cpu", "--num-data-workers", "0"]


def errors_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def usage_line(capsys) -> str:
    """The one line of an argparse-style refusal (exit 2)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line or " ERROR" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def copy_data(tiny, tmp_path, name="data") -> Path:
    out = tmp_path / name
    shutil.copytree(tiny[0], out)
    return out


# ------------------------------------------------------------------------------ runs that cannot train


@pytest.mark.parametrize("flags, cause", [
    (["--folds", "1"], "--folds 1 --cv-number 0 validates on HEPG2-01, HEPG2-02, HUVEC-01, HUVEC-02, RPE-01, U2OS-01"),
    (["--val-experiments", "HEPG2-01,HEPG2-02,HUVEC-01,HUVEC-02,RPE-01,U2OS-01"], "--val-experiments validates on"),
])
def test_validation_that_takes_every_training_well_is_refused(tiny_competition, tmp_path, caplog, flags, cause):
    """Issue 20: `sites: train 0`, train_loss 0, checkpoints written, exit 0 (the controls of all
    experiments stay in training: no treatment well did)."""
    save = tmp_path / "net"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--use-layout-leak", "false", *flags,
               *SMALL) == 2
    (line,) = errors_of(caplog)
    assert line.startswith("no treatment well left to train on: ") and cause in line and "every train experiment" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.log"]  # no settings, no checkpoint


@pytest.mark.parametrize("flags, batches", [(["-b", "1000"], "1 batch(es) of -b 1000"),
                                            (["--gradient-accumulation", "100"], "batch(es) of -b 16")])
def test_an_epoch_without_an_optimizer_step_is_refused(tiny_competition, tmp_path, caplog, flags, batches):
    """Issue 20: -b or --gradient-accumulation larger than the data: 0 optimizer steps, weights never
    changed, exit 0."""
    save = tmp_path / "net"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, *SMALL, *flags) == 2
    (line,) = errors_of(caplog)
    assert line.startswith("an epoch would take no optimizer step: the ") and batches in line
    assert "--gradient-accumulation" in line and sorted(p.name for p in tmp_path.iterdir()) == ["net.log"]


def header_only_test_csv(tiny, tmp_path) -> Path:
    data = copy_data(tiny, tmp_path)
    (data / "test.csv").write_text((data / "test.csv").read_text().splitlines()[0] + "\n")
    return data


def test_predict_without_test_wells_is_refused(trained, tiny_competition, tmp_path, caplog):
    """Issue 20: a test.csv with only its header: predict succeeded, and the submission was a header."""
    data = header_only_test_csv(tiny_competition, tmp_path)
    earlier = Path(f"{trained}.1.output_header")
    earlier.write_bytes(b"an earlier prediction")
    assert run("--mode", "predict", "--data", data, "--load", f"{trained}.1", "--pred-suffix", "_header", *WHERE) == 1
    (line,) = errors_of(caplog)
    assert line == f"{data}: the data set has no test wells (a test.csv with only its header?): nothing to predict"
    assert earlier.read_bytes() == b"an earlier prediction"
    earlier.unlink()


def test_a_submission_without_test_wells_is_refused(tmp_path, capsys):
    info = make(tmp_path, files=1)
    test = info["data"] / "test.csv"
    test.write_text(test.read_text().splitlines()[0] + "\n")
    out = tmp_path / "sub.csv"
    out.write_text("id_code,sirna\nearlier,1\n")
    assert make_submission.main(["--data", str(info["data"]), "-o", str(out), str(info["files"][0])]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {info['data']}: the metadata has no test wells (a test.csv with only its header?): a "
                   "submission of them would be a header alone\n")
    assert out.read_text() == "id_code,sirna\nearlier,1\n"


def test_a_backbone_too_deep_for_the_images_is_one_line(tiny_competition, tmp_path, caplog):
    """Issue 20: a backbone too deep for the image size was a traceback in the first batch."""
    assert run("--data", tiny_competition[0], "--save", tmp_path / "net", "-e", 1, *SMALL, "--backbone", "densenet121") == 2
    (line,) = errors_of(caplog)
    assert line.startswith("--backbone densenet121 cannot take 24x24 images: ") and "shallower backbone" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.log"]


def test_tta_crops_too_small_for_the_backbone_are_one_line(trained, tiny_competition, caplog):
    """Issue 20: --tta-size 0.01 was a traceback (1x1 crops of 24 px images)."""
    output = Path(f"{trained}.1.output_tiny")
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", f"{trained}.1", "--tta", 8,
               "--tta-size", 0.01, "--pred-suffix", "_tiny", *WHERE) == 2
    (line,) = errors_of(caplog)
    assert line.startswith("--backbone smallcnn cannot take the 1x1 crops of --tta-size 0.01 (images 24x24): ")
    assert not output.exists()


# --------------------------------------------------------------------------------- flags (exit 2)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "100000"], "--threads 100000: must be an integer in [1, "),
    (["--device", "tpu"], "--device tpu: not a device this trainer runs on; choose cpu, cuda, cuda:N or mps"),
    (["--start-epoch", "3", "-e", "3"], "--start-epoch 3 leaves no epoch to train: it must be below --epochs 3"),
    (["--pl-size-func=5*x"], "--pl-size-func '5*x' is 1.005 at x=0.201: the fraction of the wells labelled must stay"),
    (["--pl-size-func=-x"], "--pl-size-func '-x' is -0.001 at x=0.001"),
    (["--seed", "12345678901234567890"], "--seed 12345678901234567890: must be an integer in [0, 2147483648)"),
    (["--tta-size", "0"], "--tta-size 0.0: must be a finite number in (0, 1]"),
    (["--overwrite", "--resume", "x.3"], "--overwrite starts a new training run at --save afresh"),
])
def test_flags_that_cannot_work_are_one_line(argv, message, tmp_path, capsys):
    """Issue 20's flag cases beyond the table of bounds (tests/test_flag_bounds.py walks that one)."""
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", str(tmp_path / "net"), *argv])
    assert e.value.code == 2 and message in usage_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", str(tmp_path / "net"), "--device", "cuda"])
    assert e.value.code == 2 and "--device cuda: no CUDA GPU is visible here" in usage_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["-w", "1e308,1e308"], "-w/--weights 1e+308,1e+308: must be a finite number in [0, 1000000]"),
    (["-w", "nan,1"], "-w/--weights nan,1.0: must be a finite number in [0, 1000000]"),
    (["-w", "0,0"], "-w/--weights must not be all zero"),
    (["-t", "100000"], "-t/--threads 100000: must be an integer in [1, "),
    (["-t", "0"], "-t/--threads 0: must be an integer in [1, "),
])
def test_make_submission_flags_outside_their_domain(argv, message, tmp_path, capsys):
    """Issue 20: -w 1e308,1e308 overflowed its sum (a traceback); --threads 100000 blamed test.csv."""
    out = tmp_path / "sub.csv"
    assert make_submission.main(["-o", str(out), *argv, "a.output", "b.output"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()


# ------------------------------------------------------------------------------------ @files


@pytest.mark.parametrize("content, message", [
    (None, "@self.args includes itself (@self.args -> @self.args)"),
    (b"--bn-mom\n0.1\xff\n", "@bad.args line 2: byte 0xff is not UTF-8 text"),
    (b"--bn-mom\n\xe2\x80\x8b0.1\n", "@bad.args line 2: '\\u200b0.1' holds the invisible character U+200B"),
])
def test_bad_args_files_are_one_line(content, message, tmp_path, monkeypatch, capsys):
    """Issue 20: an @file that includes itself was a RecursionError, byte 0xff a UnicodeDecodeError,
    and an invisible character ended in an 'unrecognized argument' that looked right."""
    monkeypatch.chdir(tmp_path)
    name = "self.args" if content is None else "bad.args"
    Path(name).write_bytes(b"--seed\n1\n@self.args\n" if content is None else content)
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", "net", f"@{name}"])
    assert e.value.code == 2 and message in usage_line(capsys)


def test_an_args_file_that_includes_another_that_includes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("a.args").write_text("@b.args\n")
    Path("b.args").write_text("--seed\n2\n@a.args\n")
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", "net", "@a.args"])
    assert "@a.args includes itself (@a.args -> @b.args -> @a.args)" in usage_line(capsys)


def test_a_byte_order_mark_is_read_as_what_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bom.args").write_bytes(b"\xef\xbb\xbf--bn-mom\n0.25\n")
    assert main.parse_settings(["--save", "net", "@bom.args"]).model.bn_mom == 0.25


# ------------------------------------------------------------------------------- metadata


def test_a_duplicate_row_names_its_file_and_lines(tiny_competition, tmp_path, caplog):
    """Issue 20: `duplicate entry in the metadata: ['train', 'HEPG2-01', np.int64(1), 'B02']`."""
    data = copy_data(tiny_competition, tmp_path)
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(lines + [lines[2]]) + "\n")
    assert run("--data", data, "--save", tmp_path / "run" / "net", *SMALL) == 1
    (line,) = errors_of(caplog)
    assert line.startswith(f"{data / 'train.csv'} line {len(lines) + 1} repeats line 3: the same site or well (split "
                           "train, experiment ") and "np.int64" not in line


def test_an_unreadable_train_csv_says_cannot_read(tiny_competition, tmp_path, monkeypatch, caplog):
    """Issue 20: a train.csv without read permission was reported as 'cannot write ...'. (Tests run
    as root, whom permission bits do not stop: the refusal is simulated where pandas opens the file.)"""
    real = pd.read_csv

    def refused(path, *args, **kwargs):
        if Path(path).name == "train.csv":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(metadata.pd, "read_csv", refused)
    assert run("--data", tiny_competition[0], "--save", tmp_path / "net", *SMALL) == 1
    assert errors_of(caplog) == [f"cannot read {tiny_competition[0] / 'train.csv'}: Permission denied"]


def test_a_read_only_output_names_the_users_file(tmp_path, monkeypatch, capsys):
    """Issue 20: a read-only output directory named the hidden temporary file, not s.csv."""
    def refused(*args, dir=None, prefix="", suffix="", **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "x1y2" + suffix))
    info = make(tmp_path, files=1)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", refused)
    out = tmp_path / "ro" / "s.csv"
    assert make_submission.main(["--data", str(info["data"]), "-o", str(out), str(info["files"][0])]) == 1
    assert capsys.readouterr().err == f"error: cannot write {out}: Permission denied\n"
    assert not out.exists()


def release_copy(tiny_release, tmp_path) -> tuple[Path, pd.DataFrame]:
    data = copy_data(tiny_release, tmp_path)
    return data, pd.read_csv(data / "metadata.csv")


@pytest.mark.parametrize("column, value, shown", [("sirna_id", None, "sirna_id"), ("well_type", "positive_control",
                                                                                      "well_type"),
                                                  ("dataset", "test", "dataset")])
def test_the_sites_of_a_release_well_must_agree(tiny_release, tmp_path, capsys, column, value, shown):
    """Issue 20: the two sites of a well disagreeing on sirna_id, well_type or dataset: 'data set OK'
    (the competition layout, one row per well, cannot disagree)."""
    data, table = release_copy(tiny_release, tmp_path)
    train = table.index[(table["dataset"] == "train") & (table["well_type"] == "treatment")]
    first, second = train[0], train[1]
    assert table.loc[first, "well_id"] == table.loc[second, "well_id"]
    new = value if value is not None else (table.loc[second, "sirna_id"] + 1) % 8
    table.loc[second, column] = new
    table.to_csv(data / "metadata.csv", index=False)
    assert run("--mode", "check", "--data", data, "--num-data-workers", 0) == 1
    out = capsys.readouterr().out
    assert "metadata: 1 problem(s)" in out
    assert (f"{data / 'metadata.csv'} lines {first + 2} and {second + 2}: the sites of well "
            f"{table.loc[first, 'well_id']} disagree on {shown}") in out


def test_an_unlabelled_train_row_is_refused(tiny_release, tmp_path, caplog):
    data, table = release_copy(tiny_release, tmp_path)
    row = table.index[(table["dataset"] == "train") & (table["well_type"] == "treatment")][3]
    table.loc[row, "sirna_id"] = np.nan
    table.to_csv(data / "metadata.csv", index=False)
    assert run("--data", data, "--save", tmp_path / "net", *SMALL) == 1
    assert errors_of(caplog) == [f"{data / 'metadata.csv'} line {row + 2}: train site {table.loc[row, 'site_id']} "
                                 "has no sirna_id (every train row needs its label)"]


def test_check_mode_on_a_header_only_metadata_csv(tiny_release, tmp_path, capsys):
    """Issue 20: `--mode check` on a metadata.csv with only its header was a traceback."""
    data, table = release_copy(tiny_release, tmp_path)
    table.iloc[:0].to_csv(data / "metadata.csv", index=False)
    assert run("--mode", "check", "--data", data, "--num-data-workers", 0) == 1
    assert f"{data}: the metadata lists no wells (a file with only its header?)" in capsys.readouterr().out


def test_check_mode_does_not_hang_on_a_fifo(tiny_competition, tmp_path):
    """Issue 20: a FIFO among the PNGs made --mode check wait for a writer forever. (A subprocess:
    a regression would hang the test, not the suite.)"""
    data = copy_data(tiny_competition, tmp_path)
    png = sorted((data / "train" / "HEPG2-01" / "Plate1").glob("*_w3.png"))[0]
    png.unlink()
    os.mkfifo(png)
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--mode", "check", "--data", str(data),
                           "--num-data-workers", "0"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 1 and f"{png} is not a regular file (a FIFO)" in done.stdout, done.stdout + done.stderr


def test_val_last_experiment_names_a_cell_type_it_leaves_untrained(tiny_competition, caplog):
    """Issue 20: a cell type with one train experiment, all of it taken for validation, passed without a word."""
    s = main.parse_settings(["--data", str(tiny_competition[0]), "--save", "x", "--val-last-experiment"])
    load_data(s.data, training=True)
    assert ("--val-last-experiment validates on RPE-01, U2OS-01, the only train experiment of RPE, U2OS: no "
            "treatment well of those cell types is trained on") in caplog.text


# ------------------------------------------------------------------------------ checkpoints and files


@pytest.mark.parametrize("edit, message", [
    (lambda s: {**s, "settings": "abc"}, "its recorded settings are not a dict of setting groups (found str): "
                                         "an edited or foreign checkpoint"),
    (lambda s: {**{k: v for k, v in s.items() if k != "settings"}, "format": "cellpaint-rcic/1", "args": "abc"},
     "its recorded arguments are not a dict (found str)"),
])
def test_a_checkpoint_whose_settings_are_a_string(trained, tiny_competition, tmp_path, caplog, edit, message):
    """Issue 20: a checkpoint whose recorded settings (or, in the first format, arguments) are a string
    was an AttributeError traceback."""
    torch.save(edit(torch.load(f"{trained}.1", weights_only=True)), tmp_path / "odd.1")
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "odd.1", *WHERE) == 1
    assert errors_of(caplog) == [f"{tmp_path / 'odd.1'}: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.1"]


def edited_predictions(info, path, change) -> Path:
    p = load_predictions(info["files"][0])
    change(p)
    save_predictions(path, p)
    return path


def test_finite_logits_that_overflow_are_one_line_without_warnings(tmp_path, capsys):
    """Issue 20: finite 3e38 logits: two numpy overflow warnings, then a message about NaN or inf."""
    info = make(tmp_path, files=1)

    def huge(p):
        for part in p.values():
            for code in part:
                part[code] = [np.full_like(v, 3e38) for v in part[code]]
    path = edited_predictions(info, tmp_path / "huge.output", huge)
    assert make_submission.main(["--data", str(info["data"]), "-o", str(tmp_path / "s.csv"), str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Warning" not in err and "overflow encountered" not in err
    assert f"{path}: " in err and "its site vectors are finite but too large to sum in float32" in err


def test_a_well_with_more_site_vectors_than_the_others(tmp_path, capsys):
    """Issue 20: a well with 3 site vectors was summed like the others (weighing it up)."""
    info = make(tmp_path, files=1)
    code = {}

    def three(p):
        code["id"] = sorted(p["test"])[0]
        p["test"][code["id"]] = p["test"][code["id"]] + [p["test"][code["id"]][0]]
    path = edited_predictions(info, tmp_path / "three.output", three)
    assert make_submission.main(["--data", str(info["data"]), "-o", str(tmp_path / "s.csv"), str(path)]) == 1
    assert capsys.readouterr().err == (f"error: {path}: test[{code['id']!r}] has 3 site vectors where the wells have 2 "
                                       "(1 such well(s) in test)\n")
    assert not (tmp_path / "s.csv").exists()


def embeddings_file(info, path, zero=lambda part, i: False) -> Path:
    wells = metadata.load_wells(info["data"])
    rng = np.random.default_rng(0)
    val = set(load_predictions(info["files"][0])["val"])
    treatment = wells[wells["well_type"] == "treatment"]
    parts = {"train": treatment[(treatment["split"] == "train") & ~treatment["id_code"].isin(val)],
             "val": treatment[treatment["id_code"].isin(val)], "test": treatment[treatment["split"] == "test"]}
    out = {}
    for part, rows in parts.items():
        out[part] = {}
        for i, code in enumerate(rows["id_code"]):
            vectors = [rng.standard_normal(8).astype(np.float32) for _ in range(2)]
            out[part][code] = [v * 0 for v in vectors] if zero(part, i) else vectors
    save_embeddings(path, out)
    return path


@pytest.mark.parametrize("zero, status, message", [
    (lambda part, i: True, 1, "every embedding is all zero: nothing to find neighbours by"),
    (lambda part, i: part == "train" and i < 2, 1, "2 train (reference) well(s) have an all-zero embedding"),
    (lambda part, i: part == "test" and i < 3, 0, "warning: 3 val/test well(s) have an all-zero embedding"),
])
def test_all_zero_embeddings_are_named(tmp_path, capsys, zero, status, message):
    """Issue 20: all-zero embeddings were accepted without a word."""
    info = make(tmp_path, files=1)
    path = embeddings_file(info, tmp_path / "e.embeddings", zero)
    rc = make_submission.main(["--data", str(info["data"]), "-o", str(tmp_path / "s.csv"), "--knn", "3", str(path)])
    captured = capsys.readouterr()
    assert rc == status and message in (captured.err if status else captured.out)
    assert (tmp_path / "s.csv").exists() == (status == 0)


def test_a_timm_weights_file_of_another_model_is_refused(tiny_competition, tmp_path, capsys):
    """Issue 20: `--backbone timm-... --pretrained FILE` of another model: a 1,300-character 'Unexpected
    keys' line, then training from random weights (the torchvision path refuses such a file)."""
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "resnet.pth")
    save = tmp_path / "run" / "net"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, *SMALL, "--backbone", "timm-regnetx_002",
               "--pretrained", tmp_path / "resnet.pth") == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    others = [line for line in err.splitlines() if " INFO: arguments: " not in line]  # the settings, logged first
    assert len(errors) == 1 and "Unexpected keys" not in err and max(map(len, others)) < 400
    assert errors[0].endswith(f"pretrained weights file {tmp_path / 'resnet.pth'} does not fit timm backbone "
                              "'regnetx_002': 219 of its 264 weights are not in the file (e.g. stem.bn.weight); "
                              "86 others are")
    assert sorted(p.name for p in save.parent.iterdir()) == ["net.log"]


def test_png_headers_are_read_from_regular_files_only(tmp_path):
    """png_size and png_planes share one header reader: a FIFO is never opened (it would wait for a
    writer), and a PNG is read for its size and its planes alike."""
    from PIL import Image
    from cellpaint.data.images import png_planes, png_size

    fifo = tmp_path / "site_w1.png"
    os.mkfifo(fifo)
    assert png_size(str(fifo)) is None and png_planes(str(fifo)) is None
    rgb = tmp_path / "site.png"
    Image.new("RGB", (7, 5)).save(rgb)
    assert png_size(str(rgb)) == (5, 7) and png_planes(str(rgb)) == 3
