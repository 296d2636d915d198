"""Each augmentation setting changes the training input on its own, in the way it says, and the
two ways of making that input agree: samples made as float on the CPU (``output="float"``) and
uint8 samples augmented batch-wise by `prepare_batch` (the production path).

Images are a few random sites written as PNGs here (16x16, 6 channels); normalisation is
`global` with fixed statistics unless a test says otherwise, so that every photometric change
stays visible after it (`sample` normalisation divides per-image affine changes out).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

import dataset
from cellpaint.core.settings import ROTATE_BORDERS, AugmentSettings
from cellpaint.data import augment

SIZE, SITES = 16, 6
MEAN = 119.5  # the global normalisation's mean: no integer intensity normalises to exactly 0
OFF = dataset.AugmentSettings(flips=False)  # augmentation on, every transform off: the draws happen, nothing changes


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> pd.DataFrame:
    """SITES sites of random pixels in 30..225 (no pixel at 0 or 255: clipping shows)."""
    root = tmp_path_factory.mktemp("sites")
    rng = np.random.default_rng(0)
    prefixes = []
    for i in range(SITES):
        prefix = root / f"B{i:02d}_s1"
        for c in range(1, 7):
            Image.fromarray(rng.integers(30, 226, (SIZE, SIZE), dtype=np.uint8)).save(f"{prefix}_w{c}.png")
        prefixes.append(str(prefix))
    return pd.DataFrame({"image_prefix": prefixes, "cell_type": "A", "sirna": np.arange(SITES)})


def make(rows: pd.DataFrame, settings: AugmentSettings | None, normalization: str = "global",
         epoch: int = 1) -> torch.Tensor:
    """The network input of every site, by both paths; fails unless they agree."""
    stats = np.tile(np.array([[MEAN] * 6, [40.0] * 6], dtype=np.float32), (len(rows), 1, 1))
    stats = None if normalization == "sample" else stats
    made = []
    for output in ("float", "uint8"):
        ds = dataset.SiteDataset(rows, ("A",), normalization, stats, settings, seed=3, output=output)
        ds.set_epoch(epoch)
        samples = [ds[i][0] for i in range(len(ds))]
        made.append(torch.stack(samples) if output == "float"
                    else dataset.prepare_batch(default_collate(samples), "cpu", settings=settings))
    as_float, as_uint8 = made
    assert torch.allclose(as_float, as_uint8, rtol=0, atol=2e-4), (as_float - as_uint8).abs().max()
    return as_uint8


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: does it differ?"""
    return (a - b).abs().flatten(1).amax(1) > 1e-3


def test_all_off_is_no_augmentation(rows):
    assert torch.equal(make(rows, OFF), make(rows, None))
    assert torch.equal(make(rows, OFF, "sample"), make(rows, None, "sample"))


@pytest.mark.parametrize("flag", [
    dict(flips=True), dict(flips=True, transposes=False), dict(min_scale=0.5), dict(scale_std=0.2),
    dict(bias_std=0.2), dict(rotate=30.0), dict(brightness=0.3), dict(contrast=0.3), dict(gamma=0.5),
    dict(gamma_range=(0.8, 1.2)), dict(rescale=0.3), dict(brightness=0.3, bc_space="raw"),
    dict(contrast=0.3, bc_space="raw")])
def test_each_flag_alone_changes_the_input(rows, flag):
    on = make(rows, dataclasses.replace(OFF, **flag))
    # most samples (a draw may land on the identity: a rescale by <1/16 keeps 16 pixels)
    assert changed(on, make(rows, OFF)).sum() >= SITES // 2, flag


def test_flip_sets(rows):
    """dihedral: the 8 flips/transposes; hv: the 4 flips, never a transpose; the input is the
    view of the site it claims."""
    plain = make(rows, OFF)
    for settings, allowed in ((dataclasses.replace(OFF, flips=True), range(8)),
                              (dataclasses.replace(OFF, flips=True, transposes=False), range(4))):
        seen = set()
        for epoch in range(10):
            got = make(rows, settings, epoch=epoch)
            for i in range(SITES):
                k = [k for k in allowed if torch.equal(augment.dihedral(plain[i], k), got[i])]
                assert k, (settings, epoch, i)
                seen.add(k[0])
        assert seen == set(allowed)


def test_zoom_interpolation(rows):
    nearest = make(rows, dataclasses.replace(OFF, min_scale=0.5))
    bilinear = make(rows, dataclasses.replace(OFF, min_scale=0.5, zoom_mode="bilinear"))
    zoomed = changed(nearest, make(rows, OFF))
    assert zoomed.sum() >= SITES - 1 and changed(nearest, bilinear)[zoomed].all()
    # nearest copies pixels: every output value is an input value of that site
    plain = make(rows, OFF)
    assert all(set(nearest[i].unique().tolist()) <= set(plain[i].unique().tolist()) for i in range(SITES))


def test_jitter_is_a_gain_and_an_offset_per_channel(rows):
    plain = make(rows, OFF)
    gain = make(rows, dataclasses.replace(OFF, scale_std=0.2)) / plain
    assert torch.allclose(gain, gain[..., :1, :1].expand_as(gain), atol=1e-3)  # one factor per channel
    offset = make(rows, dataclasses.replace(OFF, bias_std=0.2)) - plain
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-5)
    assert (gain[..., 0, 0] != 1).all() and (offset[..., 0, 0] != 0).all()


@pytest.mark.parametrize("normalization", ["global", "sample"])
def test_normalised_brightness_and_contrast_are_an_offset_and_a_factor_per_image(rows, normalization):
    plain = make(rows, OFF, normalization)
    factor = make(rows, dataclasses.replace(OFF, contrast=0.3), normalization) / plain
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-3)  # all channels alike
    assert ((factor[:, 0, 0, 0] - 1).abs() <= 0.3 + 1e-6).all() and (factor[:, 0, 0, 0] != 1).all()
    offset = make(rows, dataclasses.replace(OFF, brightness=0.3), normalization) - plain
    assert torch.allclose(offset, offset[:, :1, :1, :1].expand_as(offset), atol=1e-5)
    assert (offset[:, 0, 0, 0].abs() <= 0.3).all() and (offset[:, 0, 0, 0] != 0).all()


def test_raw_brightness_and_contrast_act_before_normalisation(rows):
    """In raw space: clip(x*c + b*mean(x), 0, 255), one c or b per image, before the (global)
    normalisation (`sample` normalisation would divide the change out again)."""
    plain = make(rows, OFF) * 40 + MEAN  # back to raw intensities
    mean = plain.mean((1, 2, 3), keepdim=True)
    contrast = make(rows, dataclasses.replace(OFF, bc_space="raw", contrast=0.3)) * 40 + MEAN
    c = (contrast / plain).flatten(1).median(1).values[:, None, None, None]
    assert torch.allclose(contrast, (plain * c).clamp(0, 255), atol=1e-3)
    assert ((c - 1).abs() <= 0.3).all() and (c != 1).all()
    brightness = make(rows, dataclasses.replace(OFF, bc_space="raw", brightness=0.3)) * 40 + MEAN
    b = (brightness - plain).flatten(1).median(1).values[:, None, None, None] / mean
    assert torch.allclose(brightness, (plain + b * mean).clamp(0, 255), atol=1e-3)
    assert (b.abs() <= 0.3).all() and (b != 0).all()
    assert (brightness == 255).any()  # the clip was reached: checked, not assumed away


def test_rotation_borders_on_both_paths(rows):
    """The border rules differ only where the turned image leaves the frame: zeros blend in raw
    intensity 0, the mirrored borders only the image's own pixels (all 30 or more here)."""
    turned = {border: make(rows, dataclasses.replace(OFF, rotate=40.0, rotate_border=border)) * 40 + MEAN
              for border in ROTATE_BORDERS}
    assert changed(turned["zeros"], make(rows, OFF) * 40 + MEAN).all()
    assert changed(turned["reflect"], turned["zeros"]).all()
    assert changed(turned["reflect-101"], turned["reflect"]).all()
    assert turned["zeros"].amin() < 1 and turned["reflect"].amin() > 29 and turned["reflect-101"].amin() > 29
    centre = (slice(None), slice(None), slice(6, 10), slice(6, 10))
    assert torch.allclose(turned["reflect"][centre], turned["zeros"][centre], atol=1e-3)
    assert torch.allclose(turned["reflect-101"][centre], turned["zeros"][centre], atol=1e-3)


def test_gamma_is_a_power_of_raw_intensities(rows):
    plain = (make(rows, OFF) * 40 + MEAN) / 255
    for flag in (dict(gamma=0.5), dict(gamma_range=(0.8, 1.2))):
        got = (make(rows, dataclasses.replace(OFF, **flag)) * 40 + MEAN) / 255
        exponent = torch.log(got) / torch.log(plain)
        assert torch.allclose(exponent, exponent[:, :1, :1, :1].expand_as(exponent), atol=1e-3)
        assert (exponent[:, 0, 0, 0] != 1).all()


def test_rescale_blurs_without_zooming(rows):
    plain = make(rows, OFF)
    got = make(rows, dataclasses.replace(OFF, rescale=0.3))
    assert changed(got, plain).sum() >= SITES // 2  # a factor in [1, 17/16) keeps 16 pixels: no change
    # a resolution jitter: the same picture, not a crop (the means stay close; a zoom would not)
    assert torch.allclose(got.mean((2, 3)), plain.mean((2, 3)), atol=0.15)


def test_aug_prob_leaves_some_samples_alone(rows):
    settings = dataclasses.replace(OFF, contrast=0.3, prob=0.5)
    plain = make(rows, OFF)
    hits = torch.stack([changed(make(rows, settings, epoch=e), plain) for e in range(8)])
    assert 0 < hits.float().mean() < 1  # sometimes on, sometimes off
    assert not changed(make(rows, dataclasses.replace(settings, prob=0.0)), plain).any()
