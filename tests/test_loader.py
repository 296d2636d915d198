"""The input pipeline: uint8 samples + prepare_batch, the decoded-image cache, unreadable images."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

import dataset
import main
from cellpaint.core.settings import AugmentSettings
from cellpaint.data import image_cache, images, metadata, pixel_stats
from cellpaint.data.augment import dihedral
from cellpaint.engine.data import load_data, make_dataset

CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")
AUGMENT = AugmentSettings(min_scale=0.5, scale_std=0.1, bias_std=0.1)
PHOTOMETRIC = AugmentSettings(min_scale=0.5, scale_std=0.1, bias_std=0.1, rotate=30, brightness=0.2,
                              contrast=0.3, gamma=0.5)


@pytest.fixture(scope="module")
def table(tiny_competition):
    return metadata.load_table(tiny_competition[0])


@pytest.fixture(scope="module")
def cache(tiny_competition, table, tmp_path_factory):
    """The tiny set's cache, built with 2 decoding processes."""
    out = tmp_path_factory.mktemp("cache")
    summary = image_cache.build_cache(tiny_competition[0], out, table, workers=2, progress=False)
    assert summary["sites_decoded"] == len(table) and summary["plates_decoded"] == summary["plates"]
    return out


def _datasets(path, table, normalization, augment, rows=slice(None, None, 9), **kw):
    rows = table.iloc[rows].reset_index(drop=True)
    per_site = pixel_stats.load_pixel_stats(path, table, None) if normalization != "sample" else None
    stats = pixel_stats.normalization_stats(rows, normalization, per_site)
    made = [dataset.SiteDataset(rows, CELL_TYPES, normalization, stats, augment, seed=7, output=out, **kw)
            for out in ("float", "uint8")]
    for ds in made:
        ds.set_epoch(3)
    return made


def _prepared(ds, **loader_kw):
    loader = dataset.SkippingLoader(ds, batch_size=8, **loader_kw)
    return torch.cat([dataset.prepare_batch(x, "cpu") for x, *_ in loader])


# ------------------------------------------------------------------------- uint8 path == float path


@pytest.mark.parametrize("augment", [None, AUGMENT, PHOTOMETRIC], ids=["plain", "augmented", "photometric"])
@pytest.mark.parametrize("normalization", pixel_stats.NORMALIZATIONS)
def test_uint8_path_equals_float_path(tiny_competition, table, normalization, augment):
    floats, uint8 = _datasets(tiny_competition[0], table, normalization, augment)
    expected = [floats[i] for i in range(len(floats))]
    raw = [uint8[i] for i in range(len(uint8))]
    x, cell, index, label = default_collate(raw)
    assert x["image"].dtype == torch.uint8 and x["image"].shape == (len(raw), 6, 24, 24)
    assert ("stats" in x) == (normalization != "sample") and ("jitter" in x) == (augment is not None)
    assert ("photometric" in x) == (augment is PHOTOMETRIC)
    got = dataset.prepare_batch(x, "cpu")
    want = torch.stack([e[0] for e in expected])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    if augment is not PHOTOMETRIC:  # both paths against the maths written out here (rotation, gamma, ...: not here)
        reference = torch.from_numpy(np.stack([
            _written_out(uint8.prefixes[i], *(x[k][i].numpy() if k in x else None for k in ("stats", "geometry", "jitter")))
            for i in range(len(raw))])).float()
        assert torch.allclose(got, reference, rtol=0, atol=1e-4), (got - reference).abs().max()
        assert torch.allclose(want, reference, rtol=0, atol=1e-4), (want - reference).abs().max()
    assert torch.equal(cell, torch.stack([e[1] for e in expected]))
    assert index.tolist() == list(range(len(raw))) and label.tolist() == [e[3] for e in expected]
    plain = dataset.normalize(x["image"].float(), x.get("stats"))
    assert torch.equal(got, plain) == (augment is None)  # augmentation did something


def _written_out(prefix: str, stats, geometry, jitter) -> np.ndarray:
    """A site as the network should see it, computed here from the PNGs with numpy alone: the
    dihedral view k (bit 0 flips the width, bit 1 the height, bit 2 transposes), the nearest-pixel
    zoom of the window (top, left, height, width) back to full size, per-channel (x - mean) / std
    (the site's own statistics without `stats`; std at least MIN_STD), then gain * x + offset."""
    img = np.stack([np.asarray(Image.open(f"{prefix}_w{c}.png"), dtype=np.float64) for c in range(1, 7)])
    if geometry is not None:
        k, top, left, ch, cw = (int(v) for v in geometry)
        img = img[:, :, ::-1] if k & 1 else img
        img = img[:, ::-1, :] if k & 2 else img
        img = img.transpose(0, 2, 1) if k & 4 else img
        h, w = img.shape[1:]
        rows, cols = top + np.arange(h) * ch // h, left + np.arange(w) * cw // w
        img = img[:, rows[:, None], cols[None, :]]
    if stats is None:
        mean, std = img.mean(axis=(1, 2)), img.std(axis=(1, 2), ddof=1)
    else:
        mean, std = stats.astype(np.float64)
    img = (img - mean[:, None, None]) / np.maximum(std, pixel_stats.MIN_STD)[:, None, None]
    if jitter is not None:
        img = img * jitter[0][:, None, None] + jitter[1][:, None, None]
    return img


def test_same_maths_as_the_loader_before_with_zoom_off(tiny_competition, table):
    """Zoom off, flips and jitter on: equal to the earlier implementation (flips on uint8, then float)."""
    augment = AugmentSettings(min_scale=1.0, scale_std=0.2, bias_std=0.3)
    _, uint8 = _datasets(tiny_competition[0], table, "experiment", augment)

    def before(index):
        rng = np.random.default_rng((uint8.seed, uint8.epoch, index))
        img = torch.from_numpy(images.read_site(uint8.prefixes[index]))
        img = dihedral(img, int(rng.integers(8))).contiguous()
        x = dataset.normalize(img, uint8.stats[index])
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        scale = 1 + 0.2 * torch.randn((6, 1, 1), generator=g)
        bias = 0.3 * torch.randn((6, 1, 1), generator=g)
        return x * scale + bias

    want = torch.stack([before(i) for i in range(len(uint8))])
    assert torch.allclose(_prepared(uint8), want, rtol=0, atol=1e-5)


def test_photometric_draws_come_after_the_others(tiny_competition, table):
    """Off: no "photometric" entry; on: every earlier draw (flips, zoom, jitter) is unchanged."""
    _, off = _datasets(tiny_competition[0], table, "sample", AUGMENT)
    _, on = _datasets(tiny_competition[0], table, "sample", PHOTOMETRIC)
    assert not AUGMENT.photometric and PHOTOMETRIC.photometric
    for i in range(len(off)):
        a, b = off[i][0], on[i][0]
        assert set(a) == {"image", "geometry", "jitter"} and set(b) == set(a) | {"photometric"}
        assert all(torch.equal(a[k], b[k]) for k in a)
        angle, gamma, contrast, brightness = b["photometric"].tolist()
        assert b["photometric"].dtype == torch.float32 and abs(angle) <= 30
        assert abs(np.log(gamma)) <= np.log(1.5) + 1e-6 and abs(contrast - 1) <= 0.3 + 1e-6 and abs(brightness) <= 0.2
    # one flag on alone draws the same value as with all of them on
    _, rotate_only = _datasets(tiny_competition[0], table, "sample", AugmentSettings(min_scale=0.5, rotate=30))
    assert torch.equal(rotate_only[0][0]["photometric"], torch.tensor([on[0][0]["photometric"][0], 1, 1, 0]))


def test_photometric_reproducible_and_varies_by_epoch(tiny_competition, table):
    floats, uint8 = _datasets(tiny_competition[0], table, "sample", PHOTOMETRIC, rows=slice(None, 4))
    first = [floats[i][0] for i in range(4)], [uint8[i][0]["photometric"] for i in range(4)]
    again = [floats[i][0] for i in range(4)], [uint8[i][0]["photometric"] for i in range(4)]
    assert all(torch.equal(a, b) for part in (0, 1) for a, b in zip(first[part], again[part]))
    for ds in (floats, uint8):
        ds.set_epoch(4)
    assert not any(torch.equal(a, uint8[i][0]["photometric"]) for i, a in enumerate(first[1]))
    assert not any(torch.equal(a, floats[i][0]) for i, a in enumerate(first[0]))


def test_brightness_contrast_set_normalised_mean_and_std(tiny_competition, table):
    """With `sample` normalisation each channel has mean 0 and std 1 before: brightness, contrast after."""
    augment = AugmentSettings(flips=False, brightness=0.5, contrast=0.4)
    floats, uint8 = _datasets(tiny_competition[0], table, "sample", augment, rows=slice(None, 6))
    for i in range(len(floats)):
        _, _, contrast, brightness = uint8[i][0]["photometric"].tolist()
        x = floats[i][0]
        assert torch.allclose(x.mean(dim=(-2, -1)), torch.full((6,), brightness), atol=1e-5)
        assert torch.allclose(x.std(dim=(-2, -1)), torch.full((6,), contrast), atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--rotate-aug", "200"], "--rotate-aug"),
    (["--contrast-aug", "1.5"], "--contrast-aug"),
    (["--gamma-aug", "-1"], "--gamma-aug"),
    (["--brightness-aug", "-0.1"], "--brightness-aug"),
])
def test_bad_photometric_flags_fail_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", str(tmp_path / "x"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    a = main.parse_settings(["--save", str(tmp_path / "x"), "--rotate-aug", "15", "--gamma-aug", "0.2"]).augment
    assert (a.rotate, a.brightness, a.contrast, a.gamma) == (15, 0, 0, 0.2)


def test_reproducible_with_any_worker_count(tiny_competition, table, cache):
    _, uint8 = _datasets(tiny_competition[0], table, "sample", AUGMENT, rows=slice(None, 48))
    _, cached = _datasets(tiny_competition[0], table, "sample", AUGMENT, rows=slice(None, 48),
                          cache=image_cache.ImageCache.open(cache, tiny_competition[0], table))
    results = [_prepared(ds, num_workers=workers) for ds in (uint8, cached) for workers in (0, 2)]
    for other in results[1:]:
        assert torch.equal(results[0], other)
    uint8.set_epoch(4)
    assert not torch.equal(results[0], _prepared(uint8))


def test_fast_png_decoder_equals_pillow(table):
    assert images.libpng_decoder() is not None
    for prefix in table["image_prefix"].iloc[::37]:
        for c in range(1, 7):
            fast = images.read_png_fast(f"{prefix}_w{c}.png")
            assert fast is not None and np.array_equal(fast, images.read_png_pillow(f"{prefix}_w{c}.png"))


# ----------------------------------------------------------------------------------------- cache


def test_cache_round_trip_equals_png_decoding(tiny_competition, table, cache):
    c = image_cache.ImageCache.open(cache, tiny_competition[0], table)
    files, rows, bad = c.locate(table)
    assert (bad == None).all()  # noqa: E711 - elementwise
    for i, prefix in enumerate(table["image_prefix"]):
        got = c.read(files[i], rows[i])
        assert got.dtype == np.uint8 and np.array_equal(got, images.read_site(prefix))
    manifest = json.loads((cache / image_cache.CACHE_MANIFEST).read_text())
    assert (manifest["sites"], manifest["height"], manifest["width"]) == (len(table), 24, 24)
    assert not list(cache.glob("*/.*.tmp"))


def test_resume_skips_complete_plates(tiny_competition, table, tmp_path, monkeypatch):
    calls = []
    real = images.read_site

    def counting(prefix, channels=6):
        calls.append(prefix)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return real(prefix, channels)

    monkeypatch.setattr(images, "read_site", counting)
    data, out = tiny_competition[0], tmp_path / "cache"
    table = table[table["experiment"].isin(table["experiment"].unique()[:3])]  # 12 plates are enough
    per_plate = len(table) // table.groupby(["experiment", "plate"]).ngroups
    stop_after = 2 * per_plate + 3  # interrupted in the third plate
    with pytest.raises(KeyboardInterrupt):
        image_cache.build_cache(data, out, table, progress=False)
    assert not (out / image_cache.CACHE_MANIFEST).exists()
    assert len(list(out.glob("*/*.npy"))) == 2 and not list(out.glob("*/.*.tmp"))
    calls.clear()
    stop_after = None
    summary = image_cache.build_cache(data, out, table, progress=False)
    assert len(calls) == len(table) - 2 * per_plate == summary["sites_decoded"]
    calls.clear()
    assert image_cache.build_cache(data, out, table, progress=False)["sites_decoded"] == 0 and not calls
    victim = sorted(out.glob("*/*.npy"))[5]
    victim.unlink()
    image_cache.build_cache(data, out, table, progress=False)
    assert len(calls) == per_plate and victim.exists()
    image_cache.ImageCache.open(out, data, table)


def test_mismatched_cache_is_refused(tiny_competition, table, cache, tmp_path):
    data = tiny_competition[0]

    def refused(match, root=cache, data_dir=data, rows=table):
        with pytest.raises(image_cache.CacheError, match=match) as e:
            image_cache.ImageCache.open(root, data_dir, rows)
        assert "\n" not in str(e.value)

    refused("no manifest.json .*prepare.py --data DATA --cache", root=tmp_path)
    refused("was built from .*, not from --data", data_dir=tmp_path)
    refused(f"holds {len(table)} sites but the data at .* has {len(table) - 2}", rows=table.iloc[:-2])
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "height": 30}))
    refused(r"holds 30x24 images but .*_w1\.png is 24x24", root=copy)
    (copy / "manifest.json").write_text("{not json")
    refused("is not a cellpaint-rcic-image-cache/2 manifest", root=copy)
    c = image_cache.ImageCache.open(cache, data, table)
    with pytest.raises(image_cache.CacheError, match="lacks 2 site.*plate .* well Z99 site 1"):
        c.locate(table.iloc[:2].assign(well="Z99", site=1))
    with pytest.raises(image_cache.CacheError, match="holds the image cache of .*choose another --cache"):
        image_cache.build_cache(tmp_path / "other", cache, table, progress=False)
    # through the trainer's flags: checked once, when the run loads its data
    s = main.parse_settings(["--save", str(tmp_path / "run"), "--data", str(data), "--image-cache", str(tmp_path / "x"),
                             "--seed", "1"])
    with pytest.raises(image_cache.CacheError, match="no manifest.json"):
        load_data(s.data, s.exec)
    s = s.replace(exec={"image_cache": cache})
    loaded = load_data(s.data, s.exec)
    ds = make_dataset(s, loaded, loaded.subsets["train"], s.augment)
    assert ds.cache is loaded.image_cache and ds.cache is not None and ds.output == "uint8"


# ------------------------------------------------------------------------------- unreadable images


def _local_sites(table, tmp_path, n=4):
    rows = table.iloc[:n].reset_index(drop=True).copy()
    for i, prefix in enumerate(rows["image_prefix"]):
        for c in range(1, 7):
            shutil.copy(f"{prefix}_w{c}.png", tmp_path / f"s{i}_w{c}.png")
        rows.loc[i, "image_prefix"] = str(tmp_path / f"s{i}")
    return rows


def test_bad_images_skipped_and_counted(table, tmp_path, caplog):
    rows = _local_sites(table, tmp_path)
    (tmp_path / "s1_w3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "s2_w5.png").unlink()
    strict = dataset.SiteDataset(rows, CELL_TYPES, output="uint8")
    with pytest.raises(images.ImageError, match=r"corrupt image: .*s1_w3\.png"):
        list(dataset.SkippingLoader(strict, batch_size=4))
    ds = dataset.SiteDataset(rows, CELL_TYPES, output="uint8", augment=AUGMENT, skip_bad_images=True)
    loader = dataset.SkippingLoader(ds, batch_size=4, description="epoch 5")
    with caplog.at_level(logging.WARNING, logger="cellpaint"):
        batches = list(loader)
    assert len(batches) == 1 and batches[0][2].tolist() == [0, 3] and loader.skipped == 2
    assert dataset.prepare_batch(batches[0][0], "cpu").shape == (2, 6, 24, 24)
    text = caplog.text
    assert "s1_w3.png" in text and "missing image" in text and "s2_w5.png" in text
    assert "epoch 5: 2 site(s) with unreadable images skipped" in text
    assert dataset.collate_skipping([None, None]) == (None, None, None, None, 2)
    assert len(list(loader)) == 1 and loader.skipped == 2  # counted per pass (an epoch), not summed over passes
    assert text.count("2 site(s) with unreadable images skipped") == 1
    one_by_one = dataset.SkippingLoader(ds, batch_size=1)
    assert [b[2].tolist() for b in one_by_one] == [[0], [3]] and one_by_one.skipped == 2  # all-bad batches not yielded


def test_bad_images_in_the_cache(table, tmp_path):
    rows = table[(table["experiment"] == table["experiment"].iat[0]) & (table["plate"] == 1)]
    rows = _local_sites(rows, tmp_path, n=len(rows))
    (tmp_path / "s5_w2.png").write_bytes((tmp_path / "s5_w2.png").read_bytes()[:40])  # truncated
    with pytest.raises(images.ImageError, match=r"s5_w2\.png"):
        image_cache.build_cache(tmp_path, tmp_path / "strict", rows, progress=False)
    summary = image_cache.build_cache(tmp_path, tmp_path / "cache", rows, skip_bad_images=True, progress=False)
    assert summary["bad"] == 1
    c = image_cache.ImageCache.open(tmp_path / "cache", tmp_path, rows)
    ds = dataset.SiteDataset(rows, CELL_TYPES, output="uint8", cache=c, skip_bad_images=True)
    assert ds[5] is None and ds[4] is not None
    with pytest.raises(images.ImageError, match=r"s5_w2\.png"):
        dataset.SiteDataset(rows, CELL_TYPES, output="uint8", cache=c)[5]


def test_training_with_skip_bad_images(tiny_competition, tmp_path, caplog):
    data = tmp_path / "d"
    shutil.copytree(tiny_competition[0], data)
    bad = sorted((data / "train" / "HEPG2-01" / "Plate1").glob("*_s1_w4.png"))[0]
    bad.write_bytes(b"not a png")
    argv = ["--data", str(data), "--save", str(tmp_path / "x"), "-e", "1", "--cv-number", "-1", "--backbone", "smallcnn",
            "--pretrained", "none", "--embedding-size", "16", "--num-data-workers", "0", "--seed", "1"]
    n = len(load_data(main.parse_settings(argv).data).subsets["train"])
    argv += ["-b", str(n), "--gradient-accumulation", "1"]  # one batch: no sample left out by drop_last
    with caplog.at_level(logging.WARNING, logger="cellpaint"):
        assert main.main([*argv, "--skip-bad-images"]) == 0
    assert f"corrupt image: {bad}" in caplog.text and "epoch 0: 1 site(s) with unreadable images skipped" in caplog.text
