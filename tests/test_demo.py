"""A shortened `make demo`: synthetic data -> train with pseudo-labels -> predict -> submission -> table."""
from __future__ import annotations

import json

import pandas as pd

import demo


def test_short_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    small = "--classes 8 --image-size 24 --train-experiments 2,2,1,1 --test-experiments 1,1,1,1 --positive-controls 2"
    rc = demo.main(["--out", str(out), "--epochs", "2", "--pl-epoch", "1", "--tta", "2", "--synthetic", small,
                    "--lr", "cosine,3e-3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "demo finished" in printed and "assignment" in printed and "groups" in printed
    report = json.loads((out / "submission.csv.json").read_text())
    stages = [s["stage"] for s in report["stages"]]
    assert stages[-2].startswith("groups") and stages[-1].startswith("assignment")
    assert all("test" in s and "all" in s["test"] for s in report["stages"])  # release layout: test labels known
    sub = pd.read_csv(out / "submission.csv")
    info = json.loads((out / "data" / "synthetic_info.json").read_text())
    assert sorted(sub["id_code"]) == sorted(info["test_labels"])
    for name in ("net.0", "net.1", "net", "net.log", "net.metrics.csv", "net.1.output", "net.1.output.log"):
        assert (out / name).exists(), name
    # a second run reuses the generated data
    assert demo.synthetic_data(out, small) == out / "data"


def test_demo_on_an_existing_competition_layout_data_set(tiny_competition, tmp_path, capsys):
    """`make demo DATA=DIR OUT=DIR`: no data is generated; without test labels only validation is scored."""
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--data", str(tiny_competition[0]), "--epochs", "2", "--pl-epoch", "1",
                      "--tta", "2", "--lr", "cosine,3e-3"]) == 0
    assert not (out / "data").exists()
    report = json.loads((out / "submission.csv.json").read_text())
    assert report["stages"][-1]["stage"].startswith("assignment")
    assert all("val" in s and not s.get("test") for s in report["stages"])
    test_wells = pd.read_csv(tiny_competition[0] / "test.csv")["id_code"]
    assert sorted(pd.read_csv(out / "submission.csv")["id_code"]) == sorted(test_wells)
