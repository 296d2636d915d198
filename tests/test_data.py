"""The data layer on real (synthetic) files: metadata table, structure, folds, subsets, samples, TTA."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dataset
from cellpaint.data import images
from cellpaint.data import metadata
from cellpaint.data.folds import assign_folds, split_subsets
from cellpaint.data.layout_matches import apply_layout_matches, find_layout_matches
from cellpaint.data.structure import derive_structure
from cellpaint.data import plates
from cellpaint.data.synthetic_config import SyntheticConfig
from cellpaint.data.synthetic import generate
from tests.conftest import TINY
from cellpaint.data import pixel_stats
from cellpaint.data import augment
from cellpaint.core.settings import AugmentSettings
from cellpaint.core.errors import DataError, UsageError


def test_both_layouts_load_to_equal_tables(tiny_competition, tiny_release):
    a = metadata.load_table(tiny_competition[0])
    b = metadata.load_table(tiny_release[0])
    assert list(a.columns) == list(b.columns) == metadata.SITE_COLUMNS
    same = [c for c in a.columns if c not in ("image_prefix", "sirna_true")]
    pd.testing.assert_frame_equal(a[same], b[same])
    # only the release layout knows test labels, and only as ground truth, never as a training label
    test_treat = (a["split"] == "test") & (a["well_type"] == "treatment")
    assert (a.loc[test_treat, "sirna_true"] == -1).all() and (a.loc[test_treat, "sirna"] == -1).all()
    labels = tiny_release[1]["test_labels"]
    assert (b.loc[test_treat, "sirna_true"].to_numpy() == b.loc[test_treat, "id_code"].map(labels).to_numpy()).all()
    # image prefixes point at real files in both layouts
    for table in (a, b):
        assert all(images.read_site(p).shape == (6, 24, 24) for p in table["image_prefix"].iloc[::97])


def test_table_counts(tiny_competition):
    table = metadata.load_table(tiny_competition[0])
    n_exp = sum(TINY["train_experiments"]) + sum(TINY["test_experiments"])
    wells_per_plate = TINY["classes"] // 4 + TINY["positive_controls"] + TINY["negative_wells"]
    assert table["experiment"].nunique() == n_exp
    assert len(table) == n_exp * 4 * wells_per_plate * 2
    assert set(table["site"]) == {1, 2}
    assert set(table["cell_type"]) == {"HEPG2", "HUVEC", "RPE", "U2OS"}
    assert (metadata.load_wells(tiny_competition[0])["id_code"].to_numpy()
            == metadata.wells_of(table)["id_code"].to_numpy()).all()


def test_derived_structure(tiny_competition):
    path, info = tiny_competition
    structure = derive_structure(metadata.load_table(path))
    assert structure.n_classes == TINY["classes"] + TINY["positive_controls"] + 1
    assert structure.treatment_classes.tolist() == list(range(TINY["classes"]))
    assert structure.control_classes.tolist() == [8, 9, 10]
    assert sorted(map(sorted, info["groups"])) == sorted(g.tolist() for g in structure.groups)
    masks = structure.group_masks()
    assert masks.sum() == TINY["classes"] and (masks.sum(0) <= 1).all()
    group_of = plates.class_groups(masks)
    wells = metadata.wells_of(metadata.load_table(path))
    labelled = wells[(wells["well_type"] == "treatment") & (wells["sirna"] >= 0)]
    for (experiment, plate), rows in labelled.groupby(["experiment", "plate"]):
        (group,) = set(group_of[rows["sirna"].to_numpy()].tolist())  # each labelled plate holds one group
        expected = info["groups"][info["plate_groups"][f"{experiment}_{plate}"]]
        assert structure.groups[group].tolist() == sorted(expected)
    with pytest.raises(UsageError, match="--classes 5"):
        derive_structure(metadata.load_table(path), n_classes=5)


def test_folds_never_split_an_experiment_and_cover_each_once(tiny_competition):
    table = metadata.load_table(tiny_competition[0])
    train_experiments = set(table.loc[table["split"] == "train", "experiment"])
    folds = assign_folds(table, n_folds=6, seed=0)
    assert set(folds) == train_experiments  # a dict: every experiment exactly one fold
    assert sorted(folds.values()) == [0, 1, 2, 3, 4, 5]  # 6 experiments, fewer per cell type than folds
    assert folds == assign_folds(table, n_folds=6, seed=0)
    assert any(assign_folds(table, 6, seed=s) != folds for s in range(1, 5))
    three = assign_folds(table, n_folds=3, seed=1)
    assert sorted(np.bincount(list(three.values()))) == [2, 2, 2]
    for cv in range(6):
        val = split_subsets(table, folds, cv)["val"]
        assert set(val["experiment"]) == {e for e, f in folds.items() if f == cv}


def test_subsets(tiny_competition):
    table = metadata.load_table(tiny_competition[0])
    folds = assign_folds(table, 6, 0)
    val_exp = {e for e, f in folds.items() if f == 2}
    s = split_subsets(table, folds, 2)
    treat = lambda df: df[df["well_type"] == "treatment"]
    assert not set(treat(s["train"])["experiment"]) & val_exp
    assert set(s["val"]["experiment"]) == val_exp and (s["val"]["well_type"] == "treatment").all()
    assert (s["train"]["sirna"] >= 0).all()
    test_treat = table[(table["split"] == "test") & (table["well_type"] == "treatment")]
    assert sorted(s["test"]["id_code"]) == sorted(test_treat["id_code"])
    controls = s["train"][s["train"]["well_type"] != "treatment"]
    assert val_exp <= set(controls["experiment"]) and set(table["experiment"]) == set(controls["experiment"])
    strict = split_subsets(table, folds, 2, all_controls_train=False)["train"]
    assert set(strict["split"]) == {"train"} and not set(strict["experiment"]) & val_exp
    everything = split_subsets(table, folds, -1)
    assert everything["val"].empty
    assert set(treat(everything["train"])["experiment"]) >= {e for e in folds}
    with pytest.raises(UsageError, match="--cv-number 9"):
        split_subsets(table, folds, 9)


def test_layout_coincidence_found_and_applied(tiny_competition):
    path, info = tiny_competition
    table = metadata.load_table(path)
    matches = find_layout_matches(table)
    leak = info["leak"]
    assert [(m.test, m.train, m.shift) for m in matches] == [(leak["test_experiment"], leak["train_experiment"], 1)]
    labelled = apply_layout_matches(table, matches)
    rows = labelled[labelled["experiment"] == leak["test_experiment"]]
    treat = rows[rows["well_type"] == "treatment"]
    assert treat["leaked"].all()
    assert (treat["sirna"].to_numpy() == treat["id_code"].map(info["test_labels"]).to_numpy()).all()
    assert not labelled.loc[labelled["experiment"] != leak["test_experiment"], "leaked"].any()
    folds = assign_folds(labelled, 6, 0)
    train = split_subsets(labelled, folds, 0)["train"]
    assert set(treat["id_code"]) <= set(train["id_code"])


def test_no_layout_coincidence_without_leak(tmp_path):
    config = SyntheticConfig(**{**TINY, "leak": False, "image_size": 8, "sites": 1, "pixel_stats": False})
    generate(tmp_path, config, progress=False)
    assert find_layout_matches(metadata.load_wells(tmp_path)) == []


# ------------------------------------------------------------------------------------- errors


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*synthetic.py"):
        metadata.load_table(tmp_path / "nowhere")
    with pytest.raises(DataError, match="neither train.csv"):
        metadata.load_table(tmp_path)


def test_csv_missing_a_column_names_file_and_column(tiny_competition, tmp_path):
    shutil.copytree(tiny_competition[0], tmp_path / "d")
    csv = tmp_path / "d" / "train.csv"
    pd.read_csv(csv).drop(columns="sirna").to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) sirna"):
        metadata.load_wells(tmp_path / "d")
    (tmp_path / "d" / "test_controls.csv").unlink()
    pd.read_csv(tiny_competition[0] / "train.csv").to_csv(csv, index=False)
    with pytest.raises(DataError, match="missing file: .*test_controls.csv"):
        metadata.load_wells(tmp_path / "d")


def test_release_bad_values(tiny_release, tmp_path):
    shutil.copytree(tiny_release[0], tmp_path / "d", ignore=shutil.ignore_patterns("images"))
    csv = tmp_path / "d" / "metadata.csv"
    df = pd.read_csv(csv)
    df.loc[3, "dataset"] = "holdout"
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match="metadata.csv: unexpected value 'holdout'"):
        metadata.load_wells(tmp_path / "d")


def test_missing_and_corrupt_png_name_the_file(tiny_competition, tmp_path):
    table = metadata.load_table(tiny_competition[0])
    prefix = table["image_prefix"].iloc[0]
    local = tmp_path / "site"
    for c in range(1, 7):
        shutil.copy(f"{prefix}_w{c}.png", f"{local}_w{c}.png")
    assert images.read_site(str(local)).dtype == np.uint8
    (tmp_path / "site_w3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(images.ImageError, match=r"corrupt image: .*site_w3\.png"):
        images.read_site(str(local))
    data = (tmp_path / "site_w2.png").read_bytes()
    (tmp_path / "site_w3.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(images.ImageError, match=r"site_w3\.png"):
        images.read_site(str(local))
    Image.new("RGB", (24, 24)).save(tmp_path / "site_w3.png")
    with pytest.raises(images.ImageError, match=r"site_w3\.png: not 8-bit single-channel \(mode RGB\)"):
        images.read_site(str(local))
    (tmp_path / "site_w3.png").unlink()
    with pytest.raises(images.ImageError, match=r"missing image: .*site_w3\.png"):
        images.read_site(str(local))
    rows = table.iloc[:1].assign(image_prefix=str(local))
    ds = dataset.SiteDataset(rows, ("HEPG2", "HUVEC", "RPE", "U2OS"), output="float")
    with pytest.raises(images.ImageError, match="site_w3.png"):
        ds[0]


# ------------------------------------------------------------------------------------- samples


def _train_dataset(path, **kw):
    table = metadata.load_table(path)
    structure = derive_structure(table)
    rows = split_subsets(table, assign_folds(table, 6, 0), 0)["train"]
    augment = AugmentSettings(min_scale=0.5, scale_std=0.1, bias_std=0.1)
    return dataset.SiteDataset(rows, structure.cell_types, augment=augment, seed=11, output="float", **kw), rows, structure


def test_samples_shapes_labels_and_one_hot(tiny_competition):
    ds, rows, structure = _train_dataset(tiny_competition[0])
    x, cell, index, label = ds[5]
    assert x.shape == (6, 24, 24) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert cell.shape == (4,) and cell.sum() == 1 and structure.cell_types[int(cell.argmax())] == rows["cell_type"].iat[5]
    assert index == 5 and label == rows["sirna"].iat[5]
    relabelled = dataset.SiteDataset(rows, structure.cell_types, labels=np.full(len(rows), 7), output="float")
    assert relabelled[5][3] == 7


def test_augmentations_are_reproducible_and_vary(tiny_competition):
    ds, rows, structure = _train_dataset(tiny_competition[0])
    ds.set_epoch(1)
    a = ds[3][0]
    again, _, _ = _train_dataset(tiny_competition[0])  # reproducible: another dataset, same seed and epoch
    again.set_epoch(1)
    assert torch.equal(a, again[3][0]) and torch.equal(a, ds[3][0])
    ds.set_epoch(2)
    assert not torch.equal(a, ds[3][0])  # varies by epoch
    assert not torch.equal(a, ds[4][0])  # and by sample
    other_seed = dataset.SiteDataset(rows, structure.cell_types, augment=ds.augment, seed=12, output="float")
    other_seed.set_epoch(1)
    assert not torch.equal(a, other_seed[3][0])  # and by seed
    plain = dataset.SiteDataset(rows, structure.cell_types, output="float")  # no augmentation: the same every epoch, and not a's
    plain.set_epoch(1)
    b = plain[3][0]
    plain.set_epoch(2)
    assert torch.equal(b, plain[3][0]) and not torch.equal(a, b) and a.shape == b.shape


def test_augmentations_do_not_depend_on_workers(tiny_competition):
    ds, _, _ = _train_dataset(tiny_competition[0])
    ds.set_epoch(4)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=8, num_workers=workers)
        batches.append(torch.cat([x for x, *_ in loader]))
    assert torch.equal(*batches)


def test_geometric_augmentations_keep_shape_and_dtype():
    img = torch.arange(6 * 20 * 20, dtype=torch.int32).reshape(6, 20, 20).to(torch.uint8)
    rng = np.random.default_rng(0)
    out = augment.zoom(img, augment.draw_zoom_box(rng, 20, 20, 0.5))
    assert out.shape == img.shape and out.dtype == torch.uint8
    assert {augment.dihedral(img, k).shape for k in range(8)} == {img.shape}
    assert len({augment.dihedral(img, k).numpy().tobytes() for k in range(8)}) == 8
    assert torch.equal(augment.zoom(img, augment.draw_zoom_box(rng, 20, 20, 1.0)), img)
    jittered = augment.channel_jitter(torch.zeros(2, 6, 4, 4), 0.1, 0.5, torch.Generator().manual_seed(0))
    assert jittered.shape == (2, 6, 4, 4) and jittered[0, 0].unique().numel() == 1 and jittered.std() > 0
    with pytest.raises(ValueError, match="--scale-aug"):
        AugmentSettings(min_scale=0)


def test_rotation():
    x = torch.rand(3, 2, 16, 16)
    out = augment.rotate(x, torch.tensor([90.0, -90.0, 0.0]))
    inner = (..., slice(1, -1), slice(1, -1))  # bilinear sampling may differ at the border
    assert torch.allclose(out[0][inner], torch.rot90(x[0], 1, (-2, -1))[inner], atol=1e-5)
    assert torch.allclose(out[1][inner], torch.rot90(x[1], -1, (-2, -1))[inner], atol=1e-5)
    assert torch.allclose(out[2], x[2], atol=1e-5)
    assert augment.rotate(x, torch.zeros(3)) is x  # no work when no image turns
    # non-square: rigid in pixel space (a point 5 right, 2 down of the centre goes to 2 right, 5 up)
    point = torch.zeros(1, 1, 15, 25)
    point[0, 0, 7 + 2, 12 + 5] = 1
    turned = augment.rotate(point, torch.tensor([90.0]))
    assert turned.shape == point.shape and turned[0, 0, 7 - 5, 12 + 2] > 0.999 and turned.sum() < 1.001
    corners = augment.rotate(torch.full((1, 1, 16, 16), 9.0), torch.tensor([45.0]))
    assert corners[0, 0, 0, 0] == 0 and corners[0, 0, 8, 8] == 9  # zero fill, centre kept


def test_gamma_brightness_contrast():
    x = torch.linspace(0, 255, 6 * 8 * 8).reshape(1, 6, 8, 8)
    assert torch.equal(augment.adjust_gamma(x, torch.ones(1)), x)
    assert torch.equal(augment.brightness_contrast(x, torch.ones(1), torch.zeros(1)), x)
    grey = torch.full((2, 1, 4, 4), 128.0)
    out = augment.adjust_gamma(grey, torch.tensor([2.0, 0.5]))
    assert (out[0] < 128).all() and (out[1] > 128).all()  # gamma > 1 darkens mid-grey, < 1 brightens
    assert augment.adjust_gamma(x, torch.tensor([3.0])).flatten()[[0, -1]].tolist() == [0, 255]  # ends kept
    assert torch.allclose(augment.brightness_contrast(x, torch.tensor([0.5]), torch.tensor([2.0])), x * 0.5 + 2)
    for bad, match in [(dict(rotate=200), "--rotate-aug"), (dict(contrast=1.0), "--contrast-aug"),
                       (dict(gamma=-1), "--gamma-aug"), (dict(brightness=float("nan")), "--brightness-aug")]:
        with pytest.raises(ValueError, match=match):
            AugmentSettings(**bad)
    assert AugmentSettings(gamma=0.1).photometric and not AugmentSettings(min_scale=0.5, scale_std=1).photometric


def test_normalisations(tiny_competition):
    path = tiny_competition[0]
    table = metadata.load_table(path)
    x = dataset.normalize(torch.from_numpy(images.read_site(table["image_prefix"].iat[0])))
    assert torch.allclose(x.mean((1, 2)), torch.zeros(6), atol=1e-4)
    assert torch.allclose(x.std((1, 2)), torch.ones(6), atol=1e-3)
    given = pixel_stats.load_pixel_stats(path, table, None)
    computed = pixel_stats.compute_pixel_stats(table)
    merged = given.merge(computed, on=["id_code", "site", "channel"])
    assert len(merged) == len(table) * 6
    assert np.allclose(merged["mean_x"], merged["mean_y"], atol=1e-3)
    assert np.allclose(merged["std_x"], merged["std_y"], atol=1e-3)
    for mode in ("experiment", "global"):
        stats = pixel_stats.normalization_stats(table, mode, given)
        assert stats.shape == (len(table), 2, 6)
    # experiment statistics equal the statistics of all the experiment's pixels pooled
    exp = table["experiment"].iat[0]
    rows = table[table["experiment"] == exp]
    pixels = np.stack([images.read_site(p) for p in rows["image_prefix"]]).astype(np.float64)
    stats = pixel_stats.normalization_stats(table, "experiment", given)[0]
    assert np.allclose(stats[0], pixels.mean((0, 2, 3)), rtol=1e-4)
    assert np.allclose(stats[1], pixels.std((0, 2, 3)), rtol=1e-4)
    glob = pixel_stats.normalization_stats(table, "global", given)
    assert np.allclose(glob[0], glob[-1])


def test_pixel_stats_computed_once_and_cached(tiny_release, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny_release[0], data, ignore=shutil.ignore_patterns("pixel_stats.csv"))
    table = metadata.load_table(data)
    stats = pixel_stats.load_pixel_stats(data, table, tmp_path / "cache")
    assert (tmp_path / "cache" / "pixel_stats.csv").exists() and len(stats) == len(table) * 6

    def no_second_pass(_):
        raise AssertionError("pixel statistics computed twice")
    monkeypatch.setattr(pixel_stats, "compute_pixel_stats", no_second_pass)
    cached = pixel_stats.load_pixel_stats(data, table, tmp_path / "cache")
    assert np.allclose(cached["mean"], stats["mean"]) and np.allclose(cached["std"], stats["std"])


# ---------------------------------------------------------------------------------------- TTA


def test_tta_views_distinct_identity_first():
    x = torch.rand(2, 6, 16, 16)
    views = dataset.tta_views(x, 8)
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({v.numpy().tobytes() for v in views}) == 8
    crops = dataset.tta_views(x, 10, size=0.75)
    assert len(crops) == 10 and all(v.shape == (2, 6, 12, 12) for v in crops)
    assert len({v.numpy().tobytes() for v in crops}) == 10
    assert torch.equal(crops[0], x[..., 2:14, 2:14])
    with pytest.raises(ValueError, match="--tta 9"):
        dataset.tta_views(x, 9)
    with pytest.raises(ValueError, match="--tta-size"):
        dataset.tta_views(x, 2, size=1.5)


def test_extra_csv_columns_are_ignored(tiny_competition, tmp_path):
    """Extra columns (notes, a user's own fold column, even names the table uses internally) change nothing."""
    shutil.copytree(tiny_competition[0], tmp_path / "d")
    for name in ("train.csv", "test.csv", "train_controls.csv"):
        csv = tmp_path / "d" / name
        df = pd.read_csv(csv)
        df.assign(note="x", split="holdout", leaked=True, image_prefix="/nowhere").to_csv(csv, index=False)
    original = metadata.load_table(tiny_competition[0])
    extra = metadata.load_table(tmp_path / "d")
    original["image_prefix"] = original["image_prefix"].str.replace(str(tiny_competition[0]), str(tmp_path / "d"))
    pd.testing.assert_frame_equal(original, extra)
