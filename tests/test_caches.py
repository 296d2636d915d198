"""Caches have a fingerprint (issue 20): the decoded-image cache (prepare.py) and the pixel-statistics
cache record the images they were made from (each PNG's size and modification time, per plate) and
the sites; a stale or foreign cache is made again where it is ours to make (prepare.py, the pixel
statistics), refused with a line naming it otherwise (--image-cache); a bad site is retried once
its PNG is readable; pixel_stats.csv is checked (channels, finite, the 8-bit range) by file and line."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import prepare
from cellpaint.data import image_cache, metadata, pixel_stats
from cellpaint.core.errors import DataError
from cellpaint.data.images import read_site
from tests.conftest import SMALL, run


@pytest.fixture
def data(tiny_competition, tmp_path) -> Path:
    """A copy of the tiny competition set (40 plates), whose images a test may change."""
    out = tmp_path / "data"
    shutil.copytree(tiny_competition[0], out)
    return out


def plate_one(data: Path) -> list[Path]:
    return sorted((data / "train" / "HEPG2-01" / "Plate1").glob("*.png"))


def regenerate(path: Path, other: Path) -> None:
    """New pixels in place, same shape (what regenerating the data set does), a later time."""
    shutil.copyfile(other, path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))


def test_a_changed_image_makes_the_cache_stale(data, tmp_path, capsys, caplog):
    """Issue 20: data regenerated in place (same shape) and --image-cache used: the predictions came
    from the old pixels; running prepare.py again kept the stale plates."""
    cache = tmp_path / "cache"
    assert prepare.main(["--data", str(data), "--cache", str(cache), "-j", "1", "-q"]) == 0
    png = plate_one(data)[0]
    regenerate(png, plate_one(data)[3])
    arrays = {p: p.read_bytes() for p in cache.glob("*/*.npy")}
    # training with it: refused in one line naming the cache and the plate, before anything is written
    assert run("--data", data, "--save", tmp_path / "run" / "net", "--image-cache", cache, "-e", 1, *SMALL) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"image cache {cache} is stale: the images of 1 plate(s) changed since it was built "
                      f"(e.g. HEPG2-01/Plate1); rebuild it with: python prepare.py --data DATA --cache {cache}"]
    assert not list((tmp_path / "run").glob("net*[0-9]")) and not (tmp_path / "run" / "net.args.json").exists()
    assert {p: p.read_bytes() for p in cache.glob("*/*.npy")} == arrays  # the cache is not ours to change there
    # prepare.py decodes that plate again, and only that one
    capsys.readouterr()
    assert prepare.main(["--data", str(data), "--cache", str(cache), "-j", "1", "-q"]) == 0
    assert "in 1 plates (39 were already complete; 1 decoded again: their images changed since)" in capsys.readouterr().out
    changed = [p for p in arrays if p.read_bytes() != arrays[p]]
    assert [p.relative_to(cache).as_posix() for p in changed] == ["HEPG2-01/Plate1.npy"]
    table = metadata.load_table(data)
    site = table[table["image_prefix"] == str(png.parent / png.name.rsplit("_w", 1)[0])]
    opened = image_cache.ImageCache.open(cache, data, table)
    files, rows, _ = opened.locate(site)
    assert len(site) == 1 and np.array_equal(opened.read(files[0], rows[0]), read_site(site["image_prefix"].iat[0]))


def test_a_bad_site_is_retried_once_its_png_is_readable(data, tmp_path, capsys):
    """Issue 20: a cache built with --skip-bad-images, the PNG restored: 'nothing to do', then
    'missing image' for a file that exists."""
    png = plate_one(data)[0]
    kept = png.read_bytes()
    png.unlink()
    cache = tmp_path / "cache"
    assert prepare.main(["--data", str(data), "--cache", str(cache), "-j", "1", "-q", "--skip-bad-images"]) == 0
    assert "1 bad site(s) recorded" in capsys.readouterr().out
    png.write_bytes(kept)
    assert prepare.main(["--data", str(data), "--cache", str(cache), "-j", "1", "-q"]) == 0
    assert "1 decoded again" in capsys.readouterr().out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert all(not plate["bad"] for plate in manifest["plates"])


def test_a_cache_with_only_the_cache_copied_is_still_used(data, tmp_path):
    """Where the PNGs are not on the machine (only the cache was copied), there is nothing to compare:
    the cache is used as before."""
    cache = tmp_path / "cache"
    image_cache.build_cache(data, cache, progress=False)
    table = metadata.load_table(data)
    for png in (data / "train").rglob("*.png"):
        png.unlink()
    for png in (data / "test").rglob("*.png"):
        png.unlink()
    assert image_cache.ImageCache.open(cache, data, table).size == (24, 24)


@pytest.mark.parametrize("edit, message", [
    (lambda m: {k: v for k, v in m.items() if k != "plates"}, "has no 'plates' (list)"),
    (lambda m: {**m, "plates": [{"file": 3}]}, "has a malformed entry 0 in 'plates'"),
    (lambda m: {**m, "format": "cellpaint-rcic-image-cache/1"}, "was built before caches recorded the images"),
])
def test_a_damaged_manifest_is_one_line(trained, data, tmp_path, caplog, edit, message):
    """Issue 20: a cache manifest without 'plates' was a KeyError traceback."""
    cache = tmp_path / "cache"
    image_cache.build_cache(data, cache, progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps(edit(manifest)))
    assert run("--mode", "val", "--data", data, "--load", f"{trained}.1", "--image-cache", cache, *SMALL) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(cache) in errors[0] and message in errors[0], errors


# ------------------------------------------------------------------------------ pixel statistics


def test_the_pixel_stats_cache_knows_its_data(tiny_release, tmp_path, monkeypatch, caplog):
    """Issue 20: --data-normalization experiment on a second data set with the same ids reused the
    first's pixel_stats.csv, and a stale cache was never named."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        shutil.copytree(tiny_release[0], folder, ignore=shutil.ignore_patterns("pixel_stats.csv"))
    plate = sorted((second / "images").glob("*/Plate1"))[0]
    for png in plate.glob("*_w2.png"):  # the second set: other pixels on one plate, the same ids
        regenerate(png, png.with_name(png.name.replace("_w2", "_w3")))
    cache = tmp_path / "cache"
    calls = []
    real = pixel_stats.compute_pixel_stats
    monkeypatch.setattr(pixel_stats, "compute_pixel_stats", lambda table, files=None: calls.append(1) or real(table, files))
    with caplog.at_level(logging.WARNING, logger="cellpaint"):
        a = pixel_stats.load_pixel_stats(first, metadata.load_table(first), cache)
        assert len(calls) == 1 and not caplog.records
        assert pixel_stats.load_pixel_stats(first, metadata.load_table(first), cache).equals(a) and len(calls) == 1
        b = pixel_stats.load_pixel_stats(second, metadata.load_table(second), cache)
    assert len(calls) == 2
    (record,) = caplog.records
    assert record.getMessage().startswith(f"pixel-statistics cache {cache / 'pixel_stats.csv'} is stale (the images "
                                          f"of 1 plate(s) changed since (e.g. {plate.parent.name}/Plate1)")
    assert not np.allclose(a["std"], b["std"])  # the second set's own statistics
    assert json.loads((cache / "pixel_stats.json").read_text())["data"] == str(second.resolve())


BAD_STATS = [
    (lambda t: t.assign(std=t["std"].astype(object).where(t.index != 4, "abc")), "line 6, column std: 'abc' is not a number"),
    (lambda t: t.assign(channel=t["channel"].where(t.index != 2, 9)), "line 4: channel 9 is not one of the images' channels 1..6"),
    (lambda t: t.assign(mean=t["mean"].where(t.index != 7, np.inf)), "line 9, column mean: inf is not a mean of 8-bit pixels"),
    (lambda t: t.assign(std=t["std"].where(t.index != 3, np.nan)), "line 5, column std: an empty value is not a number"),
    (lambda t: t.assign(std=t["std"].where(t.index != 3, -1.0)), "line 5, column std: -1.0 is not a std of 8-bit pixels"),
    (lambda t: t.drop(index=5), "has 5 channel(s), the images have 6"),
    (lambda t: pd.concat([t, t.iloc[[0]].assign(channel=7)]), "channel 7 is not one of the images' channels"),
    (lambda t: pd.concat([t.iloc[:6], t.iloc[[0]], t.iloc[6:]], ignore_index=True), "is listed twice"),
]


@pytest.mark.parametrize("edit, message", BAD_STATS, ids=["abc", "channel 9", "inf", "nan", "negative", "5 channels",
                                                          "7 channels", "twice"])
def test_a_bad_pixel_stats_csv_names_its_line(tiny_competition, tmp_path, caplog, edit, message):
    """Issue 20: std=abc or 5/7 channels were tracebacks; a channel renumbered to 9, inf, NaN or a
    negative std were accepted (stats on the wrong channel, NaN accuracy)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_competition[0], data)
    path = data / "pixel_stats.csv"
    edit(pd.read_csv(path)).to_csv(path, index=False)
    before = path.read_bytes()
    save = tmp_path / "run" / "net"
    assert run("--data", data, "--save", save, "--data-normalization", "experiment", "-e", 1, *SMALL) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(str(path)) and message in errors[0], errors
    assert "np.int64" not in errors[0] and path.read_bytes() == before
    assert sorted(p.name for p in save.parent.iterdir()) == ["net.log"]  # no checkpoint, no settings


def test_a_sound_pixel_stats_csv_reads_back_as_numbers(tiny_competition):
    path = tiny_competition[0] / "pixel_stats.csv"
    stats = pixel_stats.check_pixel_stats(pd.read_csv(path), path, 6)
    assert stats["channel"].between(1, 6).all() and stats["std"].dtype == np.float64
    with pytest.raises(DataError, match=r"line 2: .* has 1 channel\(s\), the images have 6"):
        pixel_stats.check_pixel_stats(pd.read_csv(path).iloc[[0]], path, 6)


def test_a_run_with_only_the_cache_copied_trains_from_it(tiny_release, tmp_path):
    """The cache is what travels to a GPU box: with every PNG of a release-layout set gone (its sites
    are listed in metadata.csv; the competition layout reads them off the plate folders), a run with
    --image-cache takes the channel count from the cache's manifest and trains on its pixels."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_release[0], copy)
    cache = tmp_path / "cache"
    image_cache.build_cache(copy, cache, progress=False)
    for png in copy.rglob("*.png"):
        png.unlink()
    save = tmp_path / "net"
    assert run("--data", copy, "--save", save, "-e", 1, "--image-cache", cache, *SMALL) == 0
    assert torch.load(f"{save}.0", weights_only=True)["channels"] == 6
    assert run("--data", copy, "--save", tmp_path / "other", "-e", 1, *SMALL) == 1  # without the cache: no images
