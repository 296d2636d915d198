"""Phenomic profiles: normalisation against negative controls, copairs' mAP on planted sets (checked
against average precision counted here), and --mode profiles on the competition layout."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from cellpaint.core.errors import DataError
from cellpaint.data import profiles as P
from tests.conftest import SMALL, run

FILES = {"train": "train_controls.csv", "test": "test_controls.csv"}


def planted(rng, labels=12, experiments=4, plates=2, negatives=3, dims=8, noise=0.0, offset=0.5,
            shuffle=False) -> pd.DataFrame:
    """Profiles of `experiments` x `plates` plates: each label once per experiment (its plate by
    label parity), `negatives` negative-control wells a plate; a label's wells share one vector
    (plus `noise`), every plate an offset of scale `offset`, the controls their own random vectors."""
    centre = rng.normal(size=(labels, dims))
    rows, x = [], []
    for e in range(experiments):
        offsets = rng.normal(scale=offset, size=(plates, dims))
        for label in range(labels):
            p = label % plates
            rows.append((f"E{e}", p + 1, f"T{label:02d}", "treatment", label))
            x.append(centre[label] + offsets[p] + noise * rng.normal(size=dims))
        for p in range(plates):
            for k in range(negatives):
                rows.append((f"E{e}", p + 1, f"N{k}", "negative_control", labels))
                x.append(offsets[p] + rng.normal(scale=0.8, size=dims))
    meta = pd.DataFrame(rows, columns=["Metadata_experiment", "Metadata_plate", "Metadata_well", "Metadata_well_type",
                                       "Metadata_label"])
    if shuffle:
        treated = meta["Metadata_well_type"] == "treatment"
        meta.loc[treated, "Metadata_label"] = rng.permutation(meta.loc[treated, "Metadata_label"].to_numpy())
    meta["Metadata_id_code"] = meta["Metadata_experiment"] + "_" + meta["Metadata_plate"].astype(str) + "_" + meta["Metadata_well"]
    meta["Metadata_cell_type"], meta["Metadata_split"] = "HUVEC", "train"
    features = pd.DataFrame(np.asarray(x, dtype=np.float32), columns=[f"emb_{i:04d}" for i in range(dims)])
    return pd.concat([meta, features], axis=1)


def test_controls_normalisation_centres_each_plate_on_its_negative_controls():
    profiles = planted(np.random.default_rng(0), dims=5)
    out = P.normalise(profiles, "controls", FILES)
    x = out[P.feature_columns(out)].to_numpy(np.float64)
    negative = (out["Metadata_well_type"] == "negative_control").to_numpy()
    for _, index in out.groupby(["Metadata_experiment", "Metadata_plate"]).groups.items():
        controls = x[out.index.get_indexer(index)][negative[out.index.get_indexer(index)]]
        assert np.abs(controls.mean(axis=0)).max() < 1e-5
    assert np.allclose(np.sqrt((x[negative] ** 2).mean(axis=0)), 1, atol=1e-5)  # scaled by their spread
    assert P.normalise(profiles, "none", FILES) is profiles


def test_tvn_whitens_the_negative_controls():
    profiles = planted(np.random.default_rng(1), negatives=6, dims=6)  # 48 controls for 6 features
    out = P.normalise(profiles, "tvn", FILES)
    x = out[P.feature_columns(out)].to_numpy(np.float64)
    controls = x[(out["Metadata_well_type"] == "negative_control").to_numpy()]
    assert np.abs(controls.mean(axis=0)).max() < 1e-5
    assert np.allclose(np.cov(controls, rowvar=False), np.eye(6), atol=1e-4)
    before = profiles[P.feature_columns(profiles)].to_numpy(np.float64)
    assert not np.allclose(np.cov(before[(profiles["Metadata_well_type"] == "negative_control").to_numpy()],
                                  rowvar=False), np.eye(6), atol=0.1)


def test_a_plate_without_negative_controls_names_the_file():
    profiles = planted(np.random.default_rng(2))
    lost = (profiles["Metadata_experiment"] == "E1") & (profiles["Metadata_plate"] == 2) \
        & (profiles["Metadata_well_type"] == "negative_control")
    with pytest.raises(DataError, match="train_controls.csv: E1 plate 2 has no negative-control well"):
        P.normalise(profiles[~lost].reset_index(drop=True), "controls", FILES)


def brute_force_ap(profiles: pd.DataFrame) -> pd.Series:
    """Average precision of each treatment well, counted directly: its replicates (same label, other
    experiment) ranked among themselves and the negative controls by cosine similarity."""
    x = profiles[P.feature_columns(profiles)].to_numpy(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    label, experiment = profiles["Metadata_label"].to_numpy(), profiles["Metadata_experiment"].to_numpy()
    negative = (profiles["Metadata_well_type"] == "negative_control").to_numpy()
    out = {}
    for q in np.flatnonzero(~negative):
        positives = np.flatnonzero(~negative & (label == label[q]) & (experiment != experiment[q]))
        candidates = np.concatenate([positives, np.flatnonzero(negative)])
        relevant = np.r_[np.ones(len(positives)), np.zeros(negative.sum())]
        ranked = relevant[np.argsort(-(x[candidates] @ x[q]), kind="stable")]
        hits = np.cumsum(ranked)
        out[profiles["Metadata_id_code"].iat[q]] = float((hits[ranked == 1] / (np.flatnonzero(ranked) + 1)).mean())
    return pd.Series(out)


@pytest.mark.parametrize("noise, offset", [(0.0, 0.0), (0.6, 0.5)])
def test_copairs_map_agrees_with_average_precision_counted_here(noise, offset):
    pytest.importorskip("copairs")
    from copairs.map import average_precision

    profiles = planted(np.random.default_rng(3), noise=noise, offset=offset)
    df = P.map_inputs(profiles)
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]]
    ap = average_precision(meta, df[P.feature_columns(df)].to_numpy(np.float64), P.POS_SAMEBY, P.POS_DIFFBY,
                           P.NEG_SAMEBY, P.NEG_DIFFBY, progress_bar=False)
    ap = ap[ap["Metadata_well_type"] == "treatment"].set_index("Metadata_id_code")["average_precision"]
    mine = brute_force_ap(profiles)
    assert np.allclose(ap.loc[mine.index].to_numpy(), mine.to_numpy(), atol=1e-9)
    per_label, summary = P.replicate_map(profiles)
    assert summary["mean_map"] == pytest.approx(mine.groupby(profiles.set_index("Metadata_id_code").loc[
        mine.index, "Metadata_label"].to_numpy()).mean().mean())
    if noise == offset == 0:  # replicates identical: each well's replicates come first
        assert summary["mean_map"] == pytest.approx(1.0) and summary["fraction_significant"] == 1.0
    else:
        assert 0.2 < summary["mean_map"] < 0.98


def test_map_of_shuffled_labels_is_near_chance():
    pytest.importorskip("copairs")
    profiles = planted(np.random.default_rng(4), labels=40, shuffle=True)
    per_label, summary = P.replicate_map(profiles)
    # chance: the mean normalised AP ((AP - expected) / (1 - expected)) near 0, nothing significant
    assert abs(per_label["mean_normalized_average_precision"].mean()) < 0.1
    assert summary["fraction_significant"] <= 0.05 and summary["mean_map"] < 0.5


def test_controls_of_single_wells_are_refused_for_map():
    pytest.importorskip("copairs")
    profiles = planted(np.random.default_rng(5), negatives=1)
    with pytest.raises(DataError, match="zero vectors .*cosine similarity to it is undefined"):
        P.replicate_map(P.normalise(profiles, "controls", FILES))


# ------------------------------------------------------------------------------------ the mode


def test_profiles_mode_on_the_competition_layout(tiny_competition, trained, capsys):
    pytest.importorskip("pyarrow")
    assert run("--mode", "profiles", "--data", tiny_competition[0], "--load", f"{trained}.1", "--normalise", "tvn",
               "--evaluate", "map", "--pred-suffix", "_tvn", *SMALL) == 0
    table = pd.read_parquet(f"{trained}.1.profiles_tvn.parquet")
    data = tiny_competition[0]
    wells = pd.concat([pd.read_csv(data / f) for f in ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv")])
    assert sorted(table["Metadata_id_code"]) == sorted(wells["id_code"])   # one row a well, controls included
    assert {"Metadata_experiment", "Metadata_plate", "Metadata_well", "Metadata_cell_type", "Metadata_label",
            "Metadata_well_type"} <= set(table.columns) and len(P.feature_columns(table)) == 32
    test_treatment = (table["Metadata_split"] == "test") & (table["Metadata_well_type"] == "treatment")
    assert (table.loc[test_treatment, "Metadata_label"] == -1).all()    # unknown labels stay unknown
    summary = json.loads(open(f"{trained}.1.profiles_tvn.map.json").read())
    assert summary["normalise"] == "tvn" and 0 <= summary["mean_map"] <= 1
    assert f"mAP {summary['mean_map']:.4f}" in capsys.readouterr().out


def test_profiles_without_negative_controls_name_the_file(tiny_competition, trained, tmp_path, caplog):
    data = tmp_path / "d"
    shutil.copytree(tiny_competition[0], data)
    controls = pd.read_csv(data / "train_controls.csv")
    lost = (controls["experiment"] == "HEPG2-01") & (controls["plate"] == 1) & (controls["well_type"] == "negative_control")
    controls[~lost].to_csv(data / "train_controls.csv", index=False)
    assert run("--mode", "profiles", "--data", data, "--load", f"{trained}.1", "--pred-suffix", "_x", *SMALL) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"{data / 'train_controls.csv'}: HEPG2-01 plate 1 has no negative-control well; "
                      "--normalise controls centres each plate on its own negative controls"]
    assert not list(trained.parent.glob("*.profiles_x.parquet"))
