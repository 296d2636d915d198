"""Tests of synthetic.py on real files: structure, determinism, layouts, the planted leak, learnability, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic  # noqa: E402

from cellpaint.data import synthetic as synthetic_data  # noqa: E402
from cellpaint.data.synthetic_config import SyntheticConfig  # noqa: E402
from cellpaint.data.synthetic import OutputDirError, generate  # noqa: E402

# Small enough to write in a second, big enough to have every feature (leak, drops, controls, 2 sites).
TINY = dict(cell_types=("HEPG2", "RPE"), train_experiments=(2, 1), test_experiments=(1, 1), classes=6, plates=3,
            positive_controls=2, negative_wells=2, image_size=24, sites=2, drop_wells=0.1)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, dict, SyntheticConfig]:
    """The default data set with one site per well (halves the writing time; everything else is the default)."""
    config = SyntheticConfig(sites=1)
    out = tmp_path_factory.mktemp("default")
    return out, generate(out, config, progress=False), config


def all_wells(d: Path, info: dict) -> pd.DataFrame:
    """Every written well with its class, from the competition CSVs (+ test labels kept only in the info file)."""
    train = pd.read_csv(d / "train.csv").assign(well_type="treatment", dataset="train")
    test = pd.read_csv(d / "test.csv").assign(well_type="treatment", dataset="test")
    test["sirna"] = test["id_code"].map(info["test_labels"])
    ctrl = [pd.read_csv(d / f"{s}_controls.csv").assign(dataset=s) for s in ("train", "test")]
    df = pd.concat([train, test, *ctrl], ignore_index=True)
    assert df["sirna"].notna().all()
    return df.astype({"sirna": int}).sort_values(["experiment", "plate", "well"]).reset_index(drop=True)


def control_layouts(df: pd.DataFrame) -> pd.Series:
    """(experiment, plate) -> ((well, class), ...) of the control wells: what layout-coincidence detection compares."""
    ctrl = df[df["well_type"] != "treatment"]
    return ctrl.groupby(["experiment", "plate"]).apply(lambda w: tuple(zip(w["well"], w["sirna"])), include_groups=False)


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- structure
def test_counts_files_and_images(ds):
    d, info, cfg = ds
    assert info["experiments"]["train"] == [f"{c}-{i:02d}" for c in cfg.cell_types for i in (1, 2, 3)]
    assert info["experiments"]["test"] == [f"{c}-04" for c in cfg.cell_types]
    df = all_wells(d, info)
    assert set(df["experiment"]) == set(info["experiments"]["train"] + info["experiments"]["test"])
    assert all(sorted(p) == [1, 2, 3, 4] for p in df.groupby("experiment")["plate"].unique())
    per_plate = df.groupby(["experiment", "plate"]).size()
    assert len(per_plate) == 16 * 4 and per_plate.max() == 14 == info["wells_per_plate"]
    assert per_plate.sum() == info["n_wells"] == 16 * 4 * 14 - len(info["dropped_wells"])
    assert (df["id_code"] == df["experiment"] + "_" + df["plate"].astype(str) + "_" + df["well"]).all()
    # Wells are the first 14 positions of a 384-well plate, row-major, starting at B02.
    assert set(df["well"]) == set(synthetic_data.well_names(14)) and synthetic_data.well_names(23)[-2:] == ["B23", "C02"]
    # Exactly the expected PNGs exist, nothing more.
    expected = {f"{r.dataset}/{r.experiment}/Plate{r.plate}/{r.well}_s1_w{c}.png" for r in df.itertuples() for c in range(1, 7)}
    found = {str(p.relative_to(d)) for p in d.rglob("*.png")}
    assert found == expected and len(found) == info["n_images"]
    for path in sorted(found)[::997]:
        im = Image.open(d / path)
        assert im.mode == "L" and im.size == (48, 48)
    # The CSVs are sorted by experiment, plate, well.
    train = pd.read_csv(d / "train.csv")
    assert list(train.columns) == ["id_code", "experiment", "plate", "well", "sirna"]
    assert train.equals(train.sort_values(["experiment", "plate", "well"]).reset_index(drop=True))
    assert list(pd.read_csv(d / "test.csv").columns) == ["id_code", "experiment", "plate", "well"]


def test_groups_are_a_random_partition(ds):
    _, info, cfg = ds
    groups = info["groups"]
    assert len(groups) == cfg.plates and all(len(g) == cfg.classes // cfg.plates for g in groups)
    assert sorted(c for g in groups for c in g) == list(range(cfg.classes))
    assert any(g != list(range(g[0], g[0] + len(g))) for g in groups), "groups must not be contiguous ranges"


def test_each_plate_holds_one_group_and_controls(ds):
    d, info, cfg = ds
    df = all_wells(d, info)
    T, P = cfg.classes, cfg.positive_controls
    orders = []
    for (exp, plate), w in df.groupby(["experiment", "plate"]):
        g = info["plate_groups"][f"{exp}_{plate}"]
        treat = w.loc[w["well_type"] == "treatment", "sirna"]
        assert not treat.duplicated().any() and set(treat) <= set(info["groups"][g])
        pos = w.loc[w["well_type"] == "positive_control", "sirna"]
        assert sorted(pos) == list(range(T, T + P))
        assert (w.loc[w["well_type"] == "negative_control", "sirna"] == T + P).sum() == cfg.negative_wells
        orders.append((exp, g))
    by_exp = pd.DataFrame(orders, columns=["exp", "g"]).groupby("exp")["g"].apply(list)
    assert all(sorted(o) == list(range(cfg.plates)) for o in by_exp)
    assert by_exp.apply(tuple).nunique() > 1, "the group order must differ between experiments"
    # Control positions are randomised too (needed for layout-coincidence detection to mean anything).
    ctrl = df[df["well_type"] != "treatment"].groupby(["experiment", "plate"])["well"].apply(tuple)
    assert ctrl.nunique() > len(ctrl) // 2


def test_dropped_wells_really_missing(ds):
    d, info, cfg = ds
    dropped = info["dropped_wells"]
    assert len(dropped) == round(cfg.drop_wells * 16 * cfg.classes) > 0
    df = all_wells(d, info)
    assert not set(dropped) & set(df["id_code"])
    for code in dropped:
        exp, plate, well = code.split("_")
        split = "test" if exp in info["experiments"]["test"] else "train"
        assert not list((d / split / exp / f"Plate{plate}").glob(f"{well}_*.png"))


def test_planted_leak_holds_exactly(ds):
    d, info, cfg = ds
    leak = info["leak"]
    t, r = leak["test_experiment"], leak["train_experiment"]
    assert leak["shift"] == 1 and t in info["experiments"]["test"] and r in info["experiments"]["train"]
    assert t.split("-")[0] != r.split("-")[0]
    df = all_wells(d, info).set_index(["experiment", "plate", "well"])["sirna"]
    dropped = set(info["dropped_wells"])
    for p in range(1, cfg.plates + 1):
        q = (p - 2) % cfg.plates + 1  # plate p-1, plate 1 taking the last one
        assert info["plate_groups"][f"{t}_{p}"] == info["plate_groups"][f"{r}_{q}"]
        for well in synthetic_data.well_names(info["wells_per_plate"]):
            if f"{t}_{p}_{well}" in dropped or f"{r}_{q}_{well}" in dropped:
                continue
            assert df[(t, p, well)] == df[(r, q, well)]
    # ... and no other test/train pair coincides like that (so detection has one right answer).
    ctrl = control_layouts(all_wells(d, info))
    hits = [(a, b) for a in info["experiments"]["test"] for b in info["experiments"]["train"]
            if all(ctrl[(a, p)] == ctrl[(b, (p - 2) % cfg.plates + 1)] for p in range(1, cfg.plates + 1))]
    assert hits == [(t, r)]


def test_no_leak_and_bad_configs(tmp_path):
    info = generate(tmp_path / "a", SyntheticConfig(**TINY, leak=False), progress=False)
    assert info["leak"] is None
    df = all_wells(tmp_path / "a", info)
    ctrl = control_layouts(df)
    for a in info["experiments"]["test"]:
        for b in info["experiments"]["train"]:
            for shift in range(3):
                assert not all(ctrl[(a, p)] == ctrl[(b, (p - 1 - shift) % 3 + 1)] for p in (1, 2, 3))
    for bad, msg in [(dict(classes=41), "multiple of --plates"), (dict(drop_wells=1.0), "--drop-wells"),
                     (dict(train_experiments=(1, 1)), "one count per cell type"), (dict(layout="x"), "--layout"),
                     (dict(cell_types=("HEPG2",), train_experiments=(2,), test_experiments=(1,)), "--no-leak")]:
        with pytest.raises(ValueError, match=msg):
            SyntheticConfig(**bad).validate()


# ------------------------------------------------------------------------------------------- reproducibility
def test_deterministic_and_order_independent(tmp_path):
    cfg = SyntheticConfig(**TINY)
    generate(tmp_path / "a", cfg, progress=False)
    generate(tmp_path / "b", cfg, progress=False)
    a = tree(tmp_path / "a")
    assert a == tree(tmp_path / "b") and len(a) > 100
    generate(tmp_path / "a", cfg, progress=False)  # overwriting a previous synthetic set is allowed
    assert tree(tmp_path / "a") == a
    assert synthetic_data.make_design(SyntheticConfig(**TINY, seed=1))[1]["plate_groups"] != \
        synthetic_data.make_design(cfg)[1]["plate_groups"]
    # Images are keyed by (seed, experiment, plate, well, site): adding a cell type changes none of the others.
    base = dict(TINY, drop_wells=0.0, leak=False)
    generate(tmp_path / "d", SyntheticConfig(**base), progress=False)
    more = dict(base, cell_types=("HEPG2", "RPE", "U2OS"), train_experiments=(2, 1, 1), test_experiments=(1, 1, 1))
    generate(tmp_path / "e", SyntheticConfig(**more), progress=False)
    d, e = tree(tmp_path / "d"), tree(tmp_path / "e")
    pngs = [k for k in d if k.endswith(".png")]
    assert pngs and all(d[k] == e[k] for k in pngs)


def test_layouts_agree(tmp_path):
    comp, rel = tmp_path / "comp", tmp_path / "rel"
    info_c = generate(comp, SyntheticConfig(**TINY, pixel_stats=True), progress=False)
    info_r = generate(rel, SyntheticConfig(**TINY, layout="release"), progress=False)
    assert {k: v for k, v in info_c.items() if k not in ("config", "layout")} == \
        {k: v for k, v in info_r.items() if k not in ("config", "layout")}
    meta = pd.read_csv(rel / "metadata.csv")
    assert list(meta.columns) == ["site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site",
                                  "well_type", "sirna", "sirna_id"]
    assert (meta["site_id"] == meta["well_id"] + "_" + meta["site"].astype(str)).all()
    assert (meta["cell_type"] == meta["experiment"].str.split("-").str[0]).all()
    assert meta.equals(meta.sort_values(["experiment", "plate", "well", "site"]).reset_index(drop=True))
    wells = meta[meta["site"] == 1].set_index("well_id")
    df = all_wells(comp, info_c).set_index("id_code")
    assert sorted(wells.index) == sorted(df.index)
    assert (wells.loc[df.index, "sirna_id"] == df["sirna"]).all()
    assert (wells.loc[df.index, "well_type"] == df["well_type"]).all()
    assert (wells.loc[df.index, "dataset"] == df["dataset"]).all()
    T = TINY["classes"]
    assert wells.loc[wells["sirna_id"] == T + TINY["positive_controls"], "sirna"].eq("EMPTY").all()
    assert wells.loc[wells["sirna_id"] < T, "sirna"].str.fullmatch(r"s\d{5}").all()
    # Identical image bytes in both layouts.
    for p in comp.glob("t*/*/Plate*/*.png"):
        assert p.read_bytes() == (rel / "images" / p.relative_to(comp).relative_to(p.relative_to(comp).parts[0])).read_bytes()
    assert len(list(rel.rglob("*.png"))) == len(list(comp.rglob("*.png"))) == info_c["n_images"]
    # pixel_stats.csv: one row per image, matching the pixels.
    ps = pd.read_csv(comp / "pixel_stats.csv")
    assert len(ps) == info_c["n_images"]
    for r in ps.iloc[::53].itertuples():
        split = "test" if r.experiment in info_c["experiments"]["test"] else "train"
        x = np.asarray(Image.open(comp / split / r.experiment / f"Plate{r.plate}" / f"{r.well}_s{r.site}_w{r.channel}.png"))
        assert np.isclose(r.mean, x.mean()) and np.isclose(r.std, x.std()) and (r.min, r.max) == (x.min(), x.max())


# ------------------------------------------------------------------------------------------- learnability
def site_features(folder: Path, well: str, site: int) -> list[float]:
    """Per channel: log mean, log std, a Laplacian texture energy and the bright-spot fraction."""
    f = []
    for ch in range(1, 7):
        x = np.asarray(Image.open(folder / f"{well}_s{site}_w{ch}.png"), dtype=np.float64)
        m, s = x.mean(), x.std()
        lap = np.abs(4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]).mean()
        f += [np.log1p(m), np.log1p(s), lap / (s + 1), (x > m + 2 * s).mean()]
    return f


def nearest_centroid_accuracy(d: Path, sites: int) -> tuple[float, float]:
    """Train on train experiments, score on the last train experiment of each cell type; features standardised
    per experiment (what the trainer's `experiment` normalisation does to pixels), treatment classes only."""
    tr = pd.read_csv(d / "train.csv")
    X = np.array([site_features(d / "train" / r.experiment / f"Plate{r.plate}", r.well, s)
                  for r in tr.itertuples() for s in range(1, sites + 1)])
    y, e = np.repeat(tr["sirna"].to_numpy(), sites), np.repeat(tr["experiment"].to_numpy(), sites)
    for ex in np.unique(e):
        X[e == ex] = (X[e == ex] - X[e == ex].mean(0)) / (X[e == ex].std(0) + 1e-9)
    held = np.isin(e, tr.groupby(tr["experiment"].str.split("-").str[0])["experiment"].max())
    classes = np.unique(y[~held])
    centroids = np.stack([X[~held & (y == c)].mean(0) for c in classes])
    pred = classes[((X[held][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == y[held]).mean()), 1.0 / len(classes)


def test_learnable_but_not_trivial(ds):
    d, _, cfg = ds
    acc, chance = nearest_centroid_accuracy(d, cfg.sites)
    print(f"nearest-centroid site accuracy on held-out experiments: {acc:.3f} (chance {chance:.3f})")
    assert 3 * chance < acc < 0.9


# ------------------------------------------------------------------------------------------- CLI and safety
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "synthetic.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    r = run_cli(str(out), "--cell-types", "HUVEC,RPE", "--train-experiments", "1", "--test-experiments", "1,1",
                "--classes", "8", "--plates", "2", "--image-size", "16", "--sites", "1", "--layout", "release",
                "--no-leak", "--drop-wells", "0", "--seed", "3", "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "synthetic_info.json").read_text())
    assert info["config"]["seed"] == 3 and info["leak"] is None and info["layout"] == "release"
    assert info["experiments"] == {"train": ["HUVEC-01", "RPE-01"], "test": ["HUVEC-02", "RPE-02"]}
    assert len(pd.read_csv(out / "metadata.csv")) == info["n_sites"] == 4 * 2 * (8 // 2 + 3 + 1)
    r = run_cli(str(tmp_path / "bad"), "--classes", "41", "--plates", "4")
    assert r.returncode == 2 and "--classes (41) must be a multiple of --plates (4)" in r.stderr
    assert not (tmp_path / "bad").exists()
    for bad, msg in ((["--drop-wells", "1.5"], "--drop-wells must be in [0, 1)"),
                     (["--train-experiments", "1,x"], "expected comma-separated integers"),
                     (["--layout", "kaggle"], "invalid choice"), (["--image-size", "2"], "--image-size must be in"),
                     (["--test-experiments", "1,1"], "one count per cell type (4), got 2")):
        with pytest.raises(SystemExit) as exc:  # in-process: the same argparse path, without a slow interpreter start
            synthetic.main([str(tmp_path / "bad"), *bad])
        assert exc.value.code == 2 and msg in capsys.readouterr().err, bad
    assert not (tmp_path / "bad").exists()


def test_refuses_foreign_directory(tmp_path, capsys):
    out = tmp_path / "user"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not a synthetic data set"):
        generate(out, SyntheticConfig(**TINY), progress=False)
    assert synthetic.main([str(out), "--classes", "8", "--plates", "2", "-q"]) == 2
    assert "not a synthetic data set" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    # A previous synthetic set is replaced, and files the generator does not own are left alone.
    generate(tmp_path / "prev", SyntheticConfig(**TINY), progress=False)
    (tmp_path / "prev" / "notes.txt").write_text("mine")
    info = generate(tmp_path / "prev", SyntheticConfig(**dict(TINY, layout="release")), progress=False)
    assert not (tmp_path / "prev" / "train").exists() and (tmp_path / "prev" / "metadata.csv").exists()
    assert (tmp_path / "prev" / "notes.txt").read_text() == "mine" and info["complete"]
