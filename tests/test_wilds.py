"""RxRx1-WILDS: the third layout read back exactly, its two splits row for row (counted here and,
where the `wilds` package is installed, compared with the package's own), its metric equal to the
package's evaluator, and the whole path (train, predict, eval) on 3-channel composites."""
from __future__ import annotations

import json
import logging
import shutil
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cellpaint.data import images, metadata, wilds
from cellpaint.data.synthetic import generate
from cellpaint.data.synthetic_config import SyntheticConfig
from cellpaint.core.errors import DataError
from tests.conftest import SMALL, TINY, run

# TINY's experiments (2, 2, 1, 1 train, 1 test per cell type) with a val experiment per cell type
WILDS_TINY = dict(TINY, layout="wilds", val_experiments=(1, 1, 1, 1), pixel_stats=False)
KEYS = ["experiment", "plate", "well", "site"]
STANDARD = ["--all-controls-train", "false", "--use-layout-leak", "false"]


@pytest.fixture(scope="module")
def tiny_wilds(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_wilds")
    return out, generate(out, SyntheticConfig(**WILDS_TINY), progress=False)


def _torch_scatter_mean() -> types.ModuleType:
    """wilds' evaluator averages each group's element-wise accuracies with `torch_scatter.scatter(...,
    reduce="mean")`; torch-scatter has no wheel for this torch (it is built against each release),
    so the evaluator gets torch's own scatter-mean (empty groups 0, as there). Everything else is
    the package's."""
    module = types.ModuleType("torch_scatter")

    def scatter(src, index, dim_size, reduce):
        assert reduce == "mean"
        return torch.zeros(dim_size, dtype=src.dtype).scatter_reduce(0, index, src, reduce="mean", include_self=False)

    module.scatter = scatter
    return module


@pytest.fixture(scope="module")
def wilds_package_root(tiny_wilds, tmp_path_factory):
    """The synthetic set where the `wilds` package looks for RxRx1 (ROOT/rxrx1_v1.0, with its
    release marker): its metadata.csv is enough for splits and evaluation."""
    pytest.importorskip("wilds")
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        sys.modules["torch_scatter"] = _torch_scatter_mean()
    root = tmp_path_factory.mktemp("wilds_root")
    (root / "rxrx1_v1.0").mkdir()
    shutil.copy(tiny_wilds[0] / "metadata.csv", root / "rxrx1_v1.0" / "metadata.csv")
    (root / "rxrx1_v1.0" / "RELEASE_v1.0.txt").write_text("synthetic\n")
    return root


def _package_dataset(root, scheme):
    """The package's RxRx1Dataset on the synthetic metadata. wilds 2.0.0 (2021) writes into
    `Series.values`, read-only under pandas 3's copy-on-write: while it reads the metadata,
    `.values` hands it a copy (what older pandas gave it), nothing else of it is changed."""
    from unittest import mock

    from wilds.datasets.rxrx1_dataset import RxRx1Dataset

    with mock.patch.object(pd.Series, "values", property(lambda series: series.to_numpy(copy=True))):
        return RxRx1Dataset(root_dir=str(root), download=False, split_scheme=scheme)


# ------------------------------------------------------------------------------------ the layout


def test_wilds_layout_read_back_exactly(tiny_wilds):
    data, info = tiny_wilds
    meta = pd.read_csv(data / "metadata.csv")
    assert metadata.detect_layout(data) == "wilds" and set(meta["dataset"]) == {"train", "val", "test"}
    table = metadata.load_table(data)
    both = table.merge(meta, on=KEYS, how="outer", validate="one_to_one", indicator=True, suffixes=("", "_csv"))
    assert len(table) == len(meta) and (both["_merge"] == "both").all()
    assert (both["sirna_true"] == both["sirna_id"]).all()          # every site keeps its label
    assert (both["split"] == both["dataset"]).all() and (both["id_code"] == both["well_id"]).all()
    assert (both["cell_type"] == both["cell_type_csv"]).all() and (both["well_type"] == both["well_type_csv"]).all()
    hidden = (both["dataset"] == "test") & (both["well_type"] == "treatment")
    assert (both.loc[hidden, "sirna"] == -1).all()                  # test treatment labels never reach training
    assert (both.loc[~hidden, "sirna"] == both.loc[~hidden, "sirna_id"]).all()
    assert sorted(table["site"].unique()) == [1, 2]
    files = metadata.site_files(data, table)
    assert files == images.SiteFiles(3, composite=True)            # channels from the data: RGB composites
    for prefix in table["image_prefix"].iloc[::97]:
        expected = np.asarray(Image.open(f"{prefix}.png")).transpose(2, 0, 1)
        got = images.read_site(prefix, files)
        assert got.shape == (3, 24, 24) and got.dtype == np.uint8 and np.array_equal(got, expected)
    from cellpaint.data.structure import derive_structure
    structure = derive_structure(table)
    assert structure.n_classes == meta["sirna_id"].max() + 1 == info["class_counts"]["total"]
    negative = meta.loc[meta["well_type"] == "negative_control", "sirna_id"].unique()
    assert len(negative) == 1 and negative[0] in structure.control_classes


def _count(meta: pd.DataFrame, scheme: str) -> dict[str, int]:
    """The parts' sizes straight from metadata.csv, as the wilds package defines them."""
    train, val, test = (meta["dataset"] == name for name in ("train", "val", "test"))
    s1, s2 = meta["site"] == 1, meta["site"] == 2
    if scheme == "official":
        return {"train": int((train & s1).sum()), "val": int(val.sum()), "test": int(test.sum()),
                "id_test": int((train & s2).sum())}
    per_type = meta.loc[test, "experiment"].drop_duplicates().str.split("-").str[0].value_counts()
    dropped = meta["experiment"].isin([f"{c}-{k:02d}" for c, n in per_type.items() for k in range(1, n + 1)])
    return {"train": int((train & s1 & ~dropped).sum() + (test & s1).sum()), "val": int(val.sum()),
            "test": int((test & s2).sum())}


@pytest.mark.parametrize("scheme", wilds.SCHEMES)
def test_split_parts_have_the_rows_wilds_defines(tiny_wilds, scheme):
    data, _ = tiny_wilds
    meta = pd.read_csv(data / "metadata.csv")
    table = metadata.load_table(data)
    parts = wilds.wilds_parts(table, scheme)
    assert {k: len(v) for k, v in parts.items()} == _count(meta, scheme)
    keys = [set(map(tuple, v[KEYS].to_numpy().tolist())) for v in parts.values()]
    assert sum(map(len, keys)) == len(set().union(*keys))           # no site in two parts
    if scheme == "official":
        assert sum(map(len, keys)) == len(table)                    # and every site in one
        assert set(parts["val"]["experiment"]) == set(meta.loc[meta["dataset"] == "val", "experiment"])
    else:
        assert set(wilds.dropped_experiments(table)) == {"HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01"}
        assert (parts["test"]["site"] == 2).all() and not parts["train"]["experiment"].isin(
            wilds.dropped_experiments(table)).any()


@pytest.mark.parametrize("scheme", wilds.SCHEMES)
def test_trainer_subsets_are_the_wilds_parts(tiny_wilds, scheme):
    """The standard track's rows: exactly the package's parts, train labelled (mixed-to-test trains
    on site 1 of the test experiments, whose labels the table otherwise hides)."""
    from cellpaint.core.settings import DataSettings
    from cellpaint.engine.data import load_data

    data, _ = tiny_wilds
    loaded = load_data(DataSettings(root=data, split=scheme, all_controls_train=False, use_layout_leak=False))
    assert loaded.split == scheme and loaded.channels == 3
    parts = wilds.wilds_parts(loaded.table, scheme)
    assert set(loaded.subsets) == set(parts)
    for name, rows in parts.items():
        assert loaded.subsets[name][KEYS].equals(rows[KEYS]), name
    train = loaded.subsets["train"]
    assert (train["sirna"] == train["sirna_true"]).all() and (train["sirna"] >= 0).all()
    extra = load_data(DataSettings(root=data, split=scheme, all_controls_train=True, use_layout_leak=False))
    added = extra.subsets["train"].iloc[len(train):]
    assert len(added) and (added["well_type"] != "treatment").all() and added["split"].isin(["val", "test"]).all()


@pytest.mark.parametrize("scheme", wilds.SCHEMES)
def test_splits_match_the_wilds_package(tiny_wilds, wilds_package_root, scheme):
    data, _ = tiny_wilds
    package = _package_dataset(wilds_package_root, scheme)
    meta = pd.read_csv(data / "metadata.csv")
    ours = wilds.wilds_parts(metadata.load_table(data), scheme)
    for name, code in package.split_dict.items():
        theirs = meta[package.split_array == code]
        assert set(map(tuple, theirs[KEYS].to_numpy().tolist())) == set(map(tuple, ours[name][KEYS].to_numpy().tolist()))
    assert set(package.split_dict) == set(ours)


def test_metric_equals_the_wilds_evaluator(tiny_wilds, wilds_package_root):
    data, _ = tiny_wilds
    package = _package_dataset(wilds_package_root, "official")
    meta = pd.read_csv(data / "metadata.csv")
    rng = np.random.default_rng(0)
    truth = meta["sirna_id"].to_numpy()
    for name in ("val", "test", "id_test"):
        index = np.flatnonzero(package.split_array == package.split_dict[name])
        # a mix of right and wrong predictions, so that the cell types differ
        predicted = np.where(rng.random(len(index)) < rng.random(), truth[index], rng.integers(0, truth.max() + 1, len(index)))
        theirs, _ = package.eval(torch.as_tensor(predicted), package.y_array[index], package.metadata_array[index])
        ours = wilds.wilds_metrics(meta["cell_type"].to_numpy()[index], predicted, truth[index],
                                   tuple(sorted(meta["cell_type"].unique())))
        assert set(theirs) == set(ours) - {"worst_cell_type"}
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, abs=1e-6), key


# ------------------------------------------------------------------------- the path end to end


@pytest.fixture(scope="module")
def wilds_run(tiny_wilds, tmp_path_factory):
    """One epoch of the standard track on the synthetic set, its prediction file and its eval."""
    save = tmp_path_factory.mktemp("wilds_run") / "net"
    assert run("--data", tiny_wilds[0], "--save", save, "-e", 1, *STANDARD, *SMALL) == 0
    assert run("--mode", "predict", "--data", tiny_wilds[0], "--load", f"{save}.0", *SMALL) == 0
    assert run("--mode", "eval", "--data", tiny_wilds[0], "--load", f"{save}.0") == 0
    return save


def test_model_takes_its_channels_from_the_data(wilds_run):
    state = torch.load(f"{wilds_run}.0", weights_only=True)
    assert state["channels"] == 3 and state["settings"]["data"]["split"] == "official"
    stems = [v for k, v in state["model"].items() if k.startswith("backbone.") and v.dim() == 4]
    assert stems[0].shape[1] == 3


def test_six_channel_checkpoint_on_three_channel_data_is_refused(trained, tiny_wilds, tmp_path, caplog):
    assert run("--mode", "predict", "--data", tiny_wilds[0], "--load", f"{trained}.1", "--pred-suffix", "_x", *SMALL) == 1
    assert "trained on 6-channel images but the sites of this data set have 3 channels" in caplog.text


def test_eval_writes_the_wilds_figures(tiny_wilds, wilds_run):
    from cellpaint.data.prediction_file import load_predictions

    report = json.loads(open(f"{wilds_run}.0.output.wilds.json").read())
    assert report["split"] == "official" and report["track"] == "standard" and not report["non_standard"]
    assert set(report["site"]) == {"val", "test", "id_test"} and set(report["plate_assigned"]) == {"val", "test"}
    table = metadata.load_table(tiny_wilds[0])
    parts = wilds.wilds_parts(table, "official")
    predictions = load_predictions(f"{wilds_run}.0.output")
    for name in ("val", "test", "id_test"):
        rows = parts[name]
        # each well's sites in order, arg-max over all classes, accuracy over sites: counted here directly
        predicted = np.array([predictions[name][r.id_code][k].argmax()
                              for k, r in zip(rows.groupby("id_code", sort=False).cumcount(), rows.itertuples())])
        correct = predicted == rows["sirna_true"].to_numpy()
        figures = report["site"][name]
        assert figures["acc_avg"] == pytest.approx(correct.mean())
        for cell_type, group in pd.Series(correct).groupby(rows["cell_type"].to_numpy()):
            assert figures[f"acc_cell_type:{cell_type}"] == pytest.approx(group.mean())
            assert figures[f"count_cell_type:{cell_type}"] == len(group)
        assert figures["acc_wg"] == min(v for k, v in figures.items() if k.startswith("acc_cell_type"))
    # the plate-assigned test predictions: one siRNA per treatment well and plate, from the plate's group
    assigned = report["plate_assigned"]["test"]
    assert 0 <= assigned["acc_avg"] <= 1 and assigned["count_cell_type:HEPG2"] == report["site"]["test"]["count_cell_type:HEPG2"]


def test_eval_figures_equal_the_wilds_evaluator(tiny_wilds, wilds_run, wilds_package_root):
    from cellpaint.data.prediction_file import load_predictions

    package = _package_dataset(wilds_package_root, "official")
    meta = pd.read_csv(tiny_wilds[0] / "metadata.csv")
    predictions = load_predictions(f"{wilds_run}.0.output")
    report = json.loads(open(f"{wilds_run}.0.output.wilds.json").read())
    for name in ("val", "test", "id_test"):
        index = np.flatnonzero(package.split_array == package.split_dict[name])
        rows = meta.iloc[index]
        predicted = np.array([predictions[name][r.well_id][r.site - 1 if name != "id_test" else 0].argmax()
                              for r in rows.itertuples()])
        theirs, _ = package.eval(torch.as_tensor(predicted), package.y_array[index], package.metadata_array[index])
        for key, value in theirs.items():
            assert report["site"][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_plate_assignment_gives_each_class_once_per_plate():
    from cellpaint.modes.wilds_eval import plate_assigned

    rng = np.random.default_rng(1)
    # 2 plates of one experiment, groups {0,1,2} and {3,4,5}; 3 treatment wells each, 2 sites, and a control well
    rows = pd.DataFrame({"id_code": [f"E_{p}_{w}" for p in (1, 2) for w in ("A", "B", "C", "K") for _ in (1, 2)],
                         "experiment": "E", "plate": [p for p in (1, 2) for _ in range(8)],
                         "well_type": (["treatment"] * 6 + ["negative_control"] * 2) * 2})
    logits = rng.normal(size=(16, 7)).astype(np.float32)
    logits[:6, :3] += 3  # plate 1 looks like group 0
    logits[8:14, 3:6] += 3
    masks = np.zeros((2, 7), dtype=bool)
    masks[0, :3] = masks[1, 3:6] = True
    got = plate_assigned(rows, logits, masks)
    assert sorted(set(got[:6])) == [0, 1, 2] and sorted(set(got[8:14])) == [3, 4, 5]
    assert (got[0::2][:3] == got[1::2][:3]).all()                 # both sites of a well, one siRNA
    assert got[6] == logits[6].argmax() and got[15] == logits[15].argmax()  # controls keep their own


# ---------------------------------------------------------------------------------- bad input


def _copy(tiny_wilds, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(tiny_wilds[0], data)
    return data


def test_missing_composite_named_in_one_line(tiny_wilds, tmp_path, caplog, capsys):
    data = _copy(tiny_wilds, tmp_path)
    victim = data / "images" / "HEPG2-01" / "Plate1" / "B03_s1.png"
    victim.unlink()
    assert run("--mode", "check", "--data", data) == 1
    assert f"missing image: {victim}" in capsys.readouterr().out
    assert run("--data", data, "--save", tmp_path / "x", "-e", 1, *STANDARD, *SMALL) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"missing image: {victim}"] and not list(tmp_path.glob("x.[0-9]"))


@pytest.mark.parametrize("label", [999, -1])
def test_label_outside_its_classes_names_the_file(tiny_wilds, tmp_path, caplog, label):
    data = _copy(tiny_wilds, tmp_path)
    meta = pd.read_csv(data / "metadata.csv")
    meta.loc[5, "sirna_id"] = label
    meta.to_csv(data / "metadata.csv", index=False)
    n = meta["sirna_id"].nunique()  # the classes its rows use, the typo among them
    with pytest.raises(DataError, match=rf"metadata\.csv line 7, column sirna_id: label {label} is outside 0\.\.{n - 1}"):
        metadata.load_table(data)
    assert run("--data", data, "--save", tmp_path / "x", "-e", 1, *SMALL) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{data / 'metadata.csv'} line 7" in errors[0] and "\n" not in errors[0]


def test_wilds_split_on_another_layout_is_a_usage_error(tiny_competition, tmp_path, caplog):
    assert run("--data", tiny_competition[0], "--save", tmp_path / "x", "--split", "official", *SMALL) == 2
    assert "--split official is an RxRx1-WILDS split" in caplog.text


def test_eval_refuses_another_layout_and_other_splits(tiny_wilds, wilds_run, trained, tiny_competition, caplog):
    assert run("--mode", "eval", "--data", tiny_competition[0], "--load", f"{trained}.1") == 2
    assert "--mode eval scores RxRx1-WILDS predictions" in caplog.text
    assert run("--mode", "eval", "--data", tiny_wilds[0], "--load", f"{wilds_run}.0", "--split", "mixed-to-test") == 1
    assert "predicted with another --split" in caplog.text
