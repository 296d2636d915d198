"""make_submission.py and predfile.py on small fake data sets: synthetic.py's plate design (no
images) and planted logits."""
from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import make_submission  # noqa: E402
from cellpaint.modes import submission  # noqa: E402
from cellpaint.data import synthetic_config  # noqa: E402
from cellpaint.data import synthetic as synthetic_data  # noqa: E402
from cellpaint.data.folds import assign_folds  # noqa: E402
from cellpaint.data.prediction_file import (PredictionFileError, load_predictions, load_well_sums,  # noqa: E402
                      save_predictions)

SMALL = dict(train_experiments=(2, 3, 2, 1), test_experiments=(1, 2, 1, 1), plates=4, classes=80,
             positive_controls=3, negative_wells=1)
N_TREATMENT = SMALL["classes"]  # 4 plate groups of 20 siRNAs; 24 wells a plate


def fake_logits(labels: np.ndarray, n_classes: int, sites: int, signal: float, shared: float, seed: int,
                file_index: int) -> np.ndarray:
    """float32 [wells, sites, classes]: signal * difficulty(well) on the true class + unit Gaussian
    noise, the `shared` part of its variance the same for every file (ensembling helps, not without limit)."""
    common = np.random.default_rng([seed, 1 << 20])
    difficulty = common.lognormal(0.0, 0.4, size=len(labels)).astype(np.float32)
    noise = common.standard_normal((len(labels), sites, n_classes), dtype=np.float32) * np.float32(np.sqrt(shared))
    own = np.random.default_rng([seed, file_index])
    noise += own.standard_normal(noise.shape, dtype=np.float32) * np.float32(np.sqrt(1 - shared))
    noise[np.arange(len(labels)), :, labels] += (signal * difficulty)[:, None]
    return noise


def make(tmp: Path, layout: str = "competition", drop_wells: float = 0.02, dropped_plates: int = 0,
         val: bool = True, files: int = 2, signal: float = 2.0, folds: int = 3, seed: int = 0) -> dict:
    """Metadata (synthetic.py's design) and `files` prediction files: the 'val' part the treatment
    wells of fold 0's experiments, the 'test' part every test treatment well. `dropped_plates`
    whole test plates are taken out of the metadata (competition layout)."""
    config = synthetic_config.SyntheticConfig(layout=layout, leak=False, drop_wells=drop_wells, seed=seed, **SMALL)
    data = tmp / "data"
    wells, _ = synthetic_data.write_metadata(data, config)
    wells = wells.rename(columns={"dataset": "split"})
    if dropped_plates:
        assert layout == "competition"
        plates = wells.loc[wells["split"] == "test", ["experiment", "plate"]].drop_duplicates()
        gone = set(plates.sample(n=dropped_plates, random_state=seed).itertuples(index=False, name=None))
        wells = wells[[p not in gone for p in zip(wells["experiment"], wells["plate"])]]
        for name in ("test.csv", "test_controls.csv"):
            table = pd.read_csv(data / name)
            table[[p not in gone for p in zip(table["experiment"], table["plate"])]].to_csv(data / name, index=False)
    n_classes = int(wells["sirna"].max()) + 1
    treatment = wells[wells["well_type"] == "treatment"]
    test = treatment[treatment["split"] == "test"]
    assigned = assign_folds(wells, folds, seed)
    val_experiments = sorted(e for e, f in assigned.items() if f == 0) if val else []
    val_rows = treatment[treatment["experiment"].isin(val_experiments)]
    paths = []
    for k in range(files):
        output = {}
        for part, rows in (("test", test), ("val", val_rows)):
            logits = fake_logits(rows["sirna"].to_numpy(), n_classes, config.sites, signal, 0.5,
                                 seed + (0 if part == "test" else 7919), k)
            output[part] = {code: list(site_logits) for code, site_logits in zip(rows["id_code"], logits)}
        paths.append(tmp / f"pred_{k}.output")
        save_predictions(paths[-1], output)
    return {"data": data, "files": paths, "n_classes": n_classes, "val_wells": len(val_rows),
            "test_wells": len(test), "val_experiments": val_experiments}


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> dict:
    return make(tmp_path_factory.mktemp("fake"))


def run(capsys, info: dict, out: Path, *extra: str, files=None) -> tuple[int, str, str]:
    files = info["files"] if files is None else files
    rc = make_submission.main(["--data", str(info["data"]), "-o", str(out), *extra, *map(str, files)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def stages(out: Path, split: str = "val") -> dict:
    report = json.loads(Path(f"{out}.json").read_text())
    return {s["stage"].split(" (")[0].split(":")[0]: s[split]["all"] for s in report["stages"] if s[split]}


def test_tracks_tests_and_wells(fake, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    rc, stdout, err = run(capsys, fake, out)
    assert rc == 0, err
    sub = pd.read_csv(out)
    test = pd.read_csv(fake["data"] / "test.csv")
    assert list(sub.columns) == ["id_code", "sirna"]
    assert sub["id_code"].is_unique and sorted(sub["id_code"]) == sorted(test["id_code"])
    assert sub["id_code"].is_monotonic_increasing
    # treatment classes only, never twice on a plate
    sub["plate"] = sub["id_code"].str.rsplit("_", n=1).str[0]
    assert not sub.duplicated(["plate", "sirna"]).any()
    assert sub["sirna"].between(0, N_TREATMENT - 1).all()
    assert "validation accuracy" in stdout and "assignment" in stdout
    assert Path(f"{out}.json").is_file()


def test_accuracy_rises_stage_by_stage(fake, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    assert run(capsys, fake, out)[0] == 0
    acc = stages(out)
    assert acc["average"] > max(acc["file 1"], acc["file 2"])
    assert acc["ensemble"] == acc["average"]  # equal weights
    assert acc["groups"] > acc["ensemble"]
    assert acc["assignment"] > acc["groups"]
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["plate_groups_correct"]["val"]["correct"] == report["plate_groups_correct"]["val"]["total"] > 0


def test_weights(fake, tmp_path, capsys):
    single, zero, scaled, equal = (tmp_path / f"{n}.csv" for n in ("single", "zero", "scaled", "equal"))
    assert run(capsys, fake, single, files=fake["files"][:1])[0] == 0
    assert run(capsys, fake, zero, "-w", "1,0")[0] == 0
    assert run(capsys, fake, scaled, "-w", "2.5,2.5")[0] == 0
    assert run(capsys, fake, equal)[0] == 0
    assert zero.read_text() == single.read_text()       # weight 0 removes the file
    assert scaled.read_text() == equal.read_text()      # only the ratio matters
    acc = stages(zero)
    assert acc["ensemble"] == acc["file 1"] and acc["average"] != acc["ensemble"]


def test_method_flags(fake, tmp_path, capsys):
    outs = {}
    for method, scores in (("prob", "logsoftmax"), ("prob", "logits"), ("prob", "prob"), ("argmax", "logsoftmax")):
        outs[method, scores] = tmp_path / f"{method}_{scores}.csv"
        assert run(capsys, fake, outs[method, scores], "--group-method", method, "--assign-scores", scores)[0] == 0
    # log-softmax only shifts each row by a constant: the same assignment as the raw logits
    assert outs["prob", "logsoftmax"].read_text() == outs["prob", "logits"].read_text()
    report = json.loads(Path(f"{outs['argmax', 'logsoftmax']}.json").read_text())
    assert report["group_method"] == "argmax" and report["stages"][-2]["stage"] == "groups (argmax)"


def test_control_wells_in_the_files_are_ignored(fake, tmp_path, capsys):
    controls = pd.read_csv(fake["data"] / "test_controls.csv")["id_code"].tolist()[:5]

    def add_controls(d):
        sites = next(iter(d["test"].values()))
        d["test"].update({c: [s + 100.0 for s in sites] for c in controls})  # loud, never chosen
    files = [rewrite(f, tmp_path / f"c{i}.output", add_controls) for i, f in enumerate(fake["files"])]
    plain, with_controls = tmp_path / "plain.csv", tmp_path / "controls.csv"
    assert run(capsys, fake, plain)[0] == 0
    assert run(capsys, fake, with_controls, files=files)[0] == 0
    assert with_controls.read_text() == plain.read_text()
    assert json.loads(Path(f"{with_controls}.json").read_text())["wells"]["ignored_controls"] == 5


def test_missing_wells_missing_plates_and_no_val(tmp_path, capsys):
    info = make(tmp_path, drop_wells=0.05, dropped_plates=2, val=False, seed=3)
    out = tmp_path / "sub.csv"
    rc, stdout, err = run(capsys, info, out)
    assert rc == 0, err
    test = pd.read_csv(info["data"] / "test.csv")
    assert sorted(pd.read_csv(out)["id_code"]) == sorted(test["id_code"])
    assert "no labelled wells" in stdout
    # experiments with fewer plates still get distinct groups
    groups = json.loads(Path(f"{out}.json").read_text())["test_plate_groups"]
    assert any(len(g) < 4 for g in groups.values())
    assert all(len(set(g.values())) == len(g) for g in groups.values())


def test_release_layout_scores_test_labels(tmp_path, capsys):
    info = make(tmp_path, layout="release", seed=4)
    out = tmp_path / "sub.csv"
    rc, stdout, err = run(capsys, info, out)
    assert rc == 0, err
    assert "test accuracy" in stdout
    acc = stages(out, "test")
    assert acc["assignment"] > acc["ensemble"]
    assert json.loads(Path(f"{out}.json").read_text())["wells"]["test_labelled"] == info["test_wells"]


# ------------------------------------------------------------------------------ bad input


def expect_error(capsys, info, out, *extra, files=None, match=(), status=1) -> str:
    """A one-line error, exit status 1 for input that cannot make a submission, 2 for a command line
    that cannot work (cellpaint/core/errors.py)."""
    rc, _, err = run(capsys, info, out, *extra, files=files)
    assert rc == status, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    for m in match:
        assert m in err, err
    assert not out.exists() and not Path(f"{out}.json").exists()  # nothing half-written
    return err


def rewrite(src: Path, dst: Path, change) -> Path:
    data = load_predictions(src)
    change(data)
    save_predictions(dst, data)
    return dst


def test_different_id_sets_fail_naming_the_file(fake, tmp_path, capsys):
    odd = rewrite(fake["files"][1], tmp_path / "odd.output", lambda d: d["test"].pop(next(iter(d["test"]))))
    expect_error(capsys, fake, tmp_path / "sub.csv", files=[fake["files"][0], odd],
                 match=["odd.output", "different test wells"])


def test_different_class_counts_fail_naming_the_file(fake, tmp_path, capsys):
    def widen(d):
        for part in d.values():
            for k, sites in part.items():
                part[k] = [np.append(s, 0.0) for s in sites]
    wide = rewrite(fake["files"][1], tmp_path / "wide.output", widen)
    expect_error(capsys, fake, tmp_path / "sub.csv", files=[fake["files"][0], wide],
                 match=["wide.output", "classes"])


def test_unknown_and_missing_ids_fail(fake, tmp_path, capsys):
    def add_unknown(d):
        d["test"]["NOPE-01_1_B02"] = d["test"][next(iter(d["test"]))]
    extra = rewrite(fake["files"][0], tmp_path / "extra.output", add_unknown)
    expect_error(capsys, fake, tmp_path / "a.csv", files=[extra], match=["extra.output", "NOPE-01_1_B02"])
    short = rewrite(fake["files"][0], tmp_path / "short.output", lambda d: d["test"].popitem())
    expect_error(capsys, fake, tmp_path / "b.csv", files=[short], match=["short.output", "missing"])


def test_weights_count_missing_and_corrupt_files(fake, tmp_path, capsys):
    expect_error(capsys, fake, tmp_path / "a.csv", "-w", "1,2,3", match=["3 weight(s) for 2"], status=2)
    expect_error(capsys, fake, tmp_path / "b.csv", "-w", "1,x", match=["-w"], status=2)
    expect_error(capsys, fake, tmp_path / "t.csv", "-t", "0", match=["-t/--threads"], status=2)
    (tmp_path / "dir.csv").mkdir()
    rc, _, err = run(capsys, fake, tmp_path / "dir.csv")
    assert rc == 2 and err == f"error: -o/--output {tmp_path / 'dir.csv'} is a directory\n"
    gone = tmp_path / "gone.output"
    expect_error(capsys, fake, tmp_path / "c.csv", files=[gone], match=["gone.output", "does not exist"])
    corrupt = tmp_path / "corrupt.output"
    corrupt.write_bytes(b"this is not a pickle at all\n" * 10)
    expect_error(capsys, fake, tmp_path / "d.csv", files=[fake["files"][0], corrupt], match=["corrupt.output"])
    truncated = tmp_path / "truncated.output"
    truncated.write_bytes(Path(fake["files"][0]).read_bytes()[:5000])
    expect_error(capsys, fake, tmp_path / "e.csv", files=[truncated], match=["truncated.output"])


@pytest.mark.parametrize("raised, status, line", [
    (PermissionError(13, "Permission denied", "x.output"), 1, "error: cannot read x.output: Permission denied\n"),
    (KeyboardInterrupt(), 130, "interrupted: {out} not written\n")])
def test_unreadable_input_and_ctrl_c_exit_statuses(fake, tmp_path, capsys, monkeypatch, raised, status, line):
    def build(settings):
        raise raised
    monkeypatch.setattr(submission, "build", build)
    out = tmp_path / "sub.csv"
    rc, _, err = run(capsys, fake, out)
    assert rc == status and err == line.format(out=out) and not out.exists()


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return builtins.eval, (self.code,)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_without_running(fake, tmp_path, capsys, payload):
    marker = tmp_path / "marker"
    evil = (_System(f"touch {marker}") if payload == "system"
            else _Eval(f"open({str(marker)!r}, 'w').close()"))
    path = tmp_path / "evil.output"
    # hidden inside an otherwise well-formed file
    path.write_bytes(pickle.dumps({"test": {"X_1_B02": [np.zeros(3, np.float32), evil]}, "val": {}}))
    with pytest.raises(PredictionFileError, match="refusing to load .*evil.output.*which could run code"):
        load_predictions(path)
    err = expect_error(capsys, fake, tmp_path / "sub.csv", files=[path], match=["refusing to load"])
    assert ("system" in err) if payload == "system" else ("builtins.eval" in err)
    assert not marker.exists()
    # control: the payload is live, a plain unpickler runs it (a harmless touch in tmp_path)
    pickle.loads(path.read_bytes())
    assert marker.exists()


# ------------------------------------------------------------------------------- predfile


def test_predfile_round_trip_and_structure(tmp_path):
    a, b = np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)
    path = tmp_path / "p.output"
    save_predictions(path, {"test": {"E-01_1_B02": [a, b], "E-01_1_B03": (b,)}})
    loaded = load_predictions(path)
    assert loaded["val"] == {} and set(loaded["test"]) == {"E-01_1_B02", "E-01_1_B03"}
    np.testing.assert_array_equal(loaded["test"]["E-01_1_B02"][0], a)
    sums = load_well_sums(path)
    assert sums.n_classes == 4 and sums.sums["val"].shape == (0, 4)
    np.testing.assert_array_equal(sums.sums["test"], [a + b, b])
    # older protocols (protocol 2 spells bytes through _codecs.encode) still load
    old = tmp_path / "old.output"
    old.write_bytes(pickle.dumps({"test": {"E-01_1_B02": [a.astype(np.float64)]}}, protocol=2))
    np.testing.assert_array_equal(load_well_sums(old).sums["test"][0], a)
    # files written under numpy 1 name numpy.core, not numpy._core
    legacy = tmp_path / "legacy.output"
    legacy.write_bytes(old.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in legacy.read_bytes()
    np.testing.assert_array_equal(load_well_sums(legacy).sums["test"][0], a)


@pytest.mark.parametrize("bad,message", [
    ([1, 2], "expected a dict"),
    ({"train": {}}, "unexpected part"),
    ({"test": {"a": np.zeros(3)}}, "non-empty list"),
    ({"test": {"a": [np.zeros((2, 3))]}}, "1-D"),
    ({"test": {"a": [np.zeros(3)], "b": [np.zeros(4)]}}, "4 classes"),
    ({"test": {"a": [np.array(["x"])]}}, "numeric"),
    ({"test": {"a": [np.zeros(3)]}, "val": {"a": [np.zeros(3)]}}, "more than one part"),
    ({"test": {"a": [np.array([np.nan, 0.0])]}}, "NaN"),
])
def test_malformed_files_are_named(tmp_path, bad, message):
    path = tmp_path / "bad.output"
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(PredictionFileError, match=message) as caught:
        load_well_sums(path)
    assert "bad.output" in str(caught.value)


def test_cli_subprocess(fake, tmp_path):
    out = tmp_path / "sub.csv"
    script = str(ROOT / "make_submission.py")
    ok = subprocess.run([sys.executable, script, "--data", str(fake["data"]), "-o", str(out), "-t", "1",
                         *map(str, fake["files"])], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and os.access(script, os.X_OK)
    bad = subprocess.run([sys.executable, script, "--data", str(fake["data"]), "-o", str(tmp_path / "x.csv"),
                          "-w", "1", *map(str, fake["files"])], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("killed_at", [1, 2])
def test_a_kill_between_the_renames_never_pairs_new_scores_with_an_old_csv(tmp_path, monkeypatch, killed_at):
    """make_submission's CSV and its JSON scores: killed at the first rename the old CSV stands
    alone, at the second the new one; never the old CSV beside new scores."""
    import os

    from cellpaint.core import atomic
    csv, scores = tmp_path / "sub.csv", tmp_path / "sub.csv.json"
    csv.write_text("old csv\n")
    scores.write_text("old scores\n")
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == killed_at:
            raise KeyboardInterrupt  # what SIGINT would do at that moment
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_with_companion(csv, "new csv\n", scores, "new scores\n")
    assert csv.read_text() == ("old csv\n" if killed_at == 1 else "new csv\n")
    assert not scores.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]  # no temporary files left
    monkeypatch.setattr(os, "replace", real)
    atomic.write_with_companion(csv, "new csv\n", scores, "new scores\n")
    assert (csv.read_text(), scores.read_text()) == ("new csv\n", "new scores\n")
