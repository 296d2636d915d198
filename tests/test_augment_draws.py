"""augment.py's draws and transforms against independent references: the photometric draws of a
seed by their documented formulas, the zoom window on non-square images, nearest zoom as integer
indexing, rotation with a mirrored border equal to rotating the mirror-padded image, and the
message of every refused setting (it names the flag and the value)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cellpaint.core.settings import ROTATE_BORDERS, AugmentSettings
from cellpaint.data import augment


def refused(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


# ---------------------------------------------------------------------------------- the draws


def test_photometric_draws_follow_their_formulas():
    settings = AugmentSettings(rotate=30.0, gamma=0.5, contrast=0.2, brightness=0.3)
    u = np.random.default_rng(4).uniform(-1, 1, 4)
    drawn = augment.draw_photometric(settings, np.random.default_rng(4))
    want = [30 * u[0], np.exp(np.log(1.5) * u[1]), 1 + 0.2 * u[2], 0.3 * u[3]]
    assert drawn.dtype == torch.float32 and drawn.shape == (4,)
    np.testing.assert_allclose(drawn.numpy(), want, rtol=1e-6)
    # the rescale factor comes after the four, and leaves them as they were
    rng = np.random.default_rng(4)
    rng.uniform(-1, 1, 4)
    factor = 1 + 0.1 * rng.uniform(-1, 1)
    with_rescale = AugmentSettings(rotate=30.0, gamma=0.5, contrast=0.2, brightness=0.3, rescale=0.1)
    np.testing.assert_allclose(augment.draw_photometric(with_rescale, np.random.default_rng(4)).numpy(), want + [factor],
                               rtol=1e-6)
    # --gamma-range: 1 / U(lo, hi) from the same second draw
    ranged = augment.draw_photometric(AugmentSettings(gamma_range=(0.8, 1.2)), np.random.default_rng(4))
    np.testing.assert_allclose(ranged.numpy(), [0, 1 / (0.8 + 0.4 * (u[1] + 1) / 2), 1, 0], rtol=1e-6)


def test_each_coin_of_aug_prob_sets_its_own_neutral_value():
    settings = AugmentSettings(rotate=30.0, gamma=0.5, contrast=0.2, brightness=0.3, rescale=0.1, prob=0.5)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        rng.uniform(-1, 1, 4)
        rng.uniform(-1, 1)
        rotate_on, gamma_on, bc_on, rescale_on = rng.random(4) < 0.5
        full = AugmentSettings(rotate=30.0, gamma=0.5, contrast=0.2, brightness=0.3, rescale=0.1)
        value = augment.draw_photometric(full, np.random.default_rng(seed)).tolist()
        drawn = augment.draw_photometric(settings, np.random.default_rng(seed)).tolist()
        keep = [rotate_on, gamma_on, bc_on, bc_on, rescale_on]
        assert drawn == [v if k else n for v, k, n in zip(value, keep, [0.0, 1.0, 1.0, 0.0, 1.0])], seed


def test_which_kinds_of_augmentation_are_on():
    assert AugmentSettings().geometric and not AugmentSettings(flips=False).geometric and AugmentSettings(flips=False, min_scale=0.9).geometric
    assert not AugmentSettings().jitter and AugmentSettings(scale_std=0.1).jitter and AugmentSettings(bias_std=0.1).jitter
    assert not AugmentSettings().photometric
    for flag in (dict(rotate=1.0), dict(brightness=0.1), dict(contrast=0.1), dict(gamma=0.1),
                 dict(gamma_range=(1.0, 1.0)), dict(rescale=0.1)):
        assert AugmentSettings(**flag).photometric, flag


# --------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("h, w, scale", [(20, 32, 0.5), (32, 20, 0.25), (9, 9, 0.1), (40, 12, 0.3), (40, 3, 0.25)])
def test_the_zoom_window(h, w, scale):
    """An edge drawn uniformly from [round(scale*h), h], the width following the height's scale,
    placed uniformly: every size and position happens, nothing leaves the image."""
    heights, tops, lefts = set(), set(), set()
    rng = np.random.default_rng(0)
    for _ in range(4000):
        top, left, ch, cw = augment.draw_zoom_box(rng, h, w, scale)
        assert max(1, round(h * scale)) <= ch <= h
        assert cw == (w if ch == h else max(1, min(w, round(w * ch / h))))
        assert 0 <= top <= h - ch and 0 <= left <= w - cw
        heights.add(ch)
        tops.add(top)
        lefts.add(left)
    assert heights == set(range(max(1, round(h * scale)), h + 1))
    assert tops == set(range(h - max(1, round(h * scale)) + 1))
    assert lefts == set(range(w - max(1, min(w, round(w * max(1, round(h * scale)) / h))) + 1))
    # no zoom: the whole image, and no draw taken from the generator (the later draws stay as they were)
    rng, fresh = np.random.default_rng(7), np.random.default_rng(7)
    assert augment.draw_zoom_box(rng, h, w, 1.0) == (0, 0, h, w)
    assert augment.draw_zoom_box(rng, h, w, 1.5) == (0, 0, h, w)  # any scale from 1 up
    assert rng.random() == fresh.random()


def test_dihedral_views_are_numpys_flips_and_transpose():
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for k in range(8):
        want = x
        if k & 1:
            want = want[..., ::-1]
        if k & 2:
            want = want[..., ::-1, :]
        if k & 4:
            want = np.swapaxes(want, -1, -2)
        assert augment.dihedral(torch.from_numpy(x), k).tolist() == want.tolist(), k


def test_jitter_is_exactly_a_gain_and_an_offset_per_channel():
    draws = augment.jitter_draws((3, 4), 0.2, 0.5, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    gains, offsets = 1 + 0.2 * torch.randn((3, 4), generator=g), 0.5 * torch.randn((3, 4), generator=g)
    assert draws.shape == (3, 2, 4) and torch.equal(draws, torch.stack([gains, offsets], dim=-2))
    x = torch.rand(3, 4, 5, 5)
    assert torch.equal(augment.channel_jitter(x, draws=draws),
                       x * gains[:, :, None, None] + offsets[:, :, None, None])
    assert augment.channel_jitter(x) is x and augment.channel_jitter(x, 0.0, 0.0) is x  # off: no draw, no copy
    jittered = augment.channel_jitter(x, 0.2, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(jittered, x * gains[:, :, None, None] + offsets[:, :, None, None])

def test_nearest_zoom_copies_pixel_floor_of_i_times_crop_over_size():
    img = torch.arange(5 * 7).reshape(1, 5, 7)
    out = augment.zoom(img, (1, 2, 3, 4), "nearest")
    rows = [1 + i * 3 // 5 for i in range(5)]
    cols = [2 + j * 4 // 7 for j in range(7)]
    assert out.tolist() == [[[int(img[0, r, c]) for c in cols] for r in rows]]
    assert augment.zoom(img, (0, 0, 5, 7)) is not None and torch.equal(augment.zoom(img, (0, 0, 5, 7)), img)
    smooth = augment.zoom(img.float(), (1, 2, 3, 4), "bilinear")
    assert smooth.shape == (1, 5, 7) and not torch.equal(smooth, out.float())
    with refused("unknown zoom interpolation 'cubic' (choose from nearest, bilinear)"):
        augment.zoom(img, (1, 2, 3, 4), "cubic")


def test_geometry_of_a_batch_is_each_samples_own():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    geometry = torch.tensor([[0, 0, 0, 4, 4], [5, 1, 0, 2, 2]])
    out = augment.apply_geometry(x, geometry)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], augment.zoom(augment.dihedral(x[1], 5), (1, 0, 2, 2)))
    assert augment.apply_geometry(x, torch.tensor([[0, 0, 0, 4, 4]] * 2)) is x


@pytest.mark.parametrize("border, numpy_mode", [("reflect", "symmetric"), ("reflect-101", "reflect")])
@pytest.mark.parametrize("h, w", [(12, 12), (10, 16), (2, 5)])
def test_a_mirrored_border_is_the_rotation_of_the_mirror_padded_image(border, numpy_mode, h, w):
    """cv2's BORDER_REFLECT is numpy's 'symmetric' padding, BORDER_REFLECT_101 numpy's 'reflect':
    rotating the image with the mirrored border equals rotating the mirror-padded image (zeros
    never reached) and cutting out the middle."""
    rng = np.random.default_rng(h + w)
    x = rng.random((2, 3, h, w)).astype(np.float32)
    pad = max(h, w)
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=numpy_mode)
    angles = torch.tensor([23.0, -131.0])
    want = augment.rotate(torch.from_numpy(padded), angles, "zeros")[..., pad:pad + h, pad:pad + w]
    got = augment.rotate(torch.from_numpy(x), angles, border)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("border, numpy_mode", [("reflect", "symmetric"), ("reflect-101", "reflect")])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_reflected_coordinates_fold_any_coordinate_as_numpy_pads(border, numpy_mode, size):
    """Integer coordinates up to three widths outside the image land on the pixel numpy's
    padding puts there."""
    far = 3 * size
    padded = np.pad(np.arange(size), far, mode=numpy_mode)
    coords = torch.arange(-far, size + far, dtype=torch.float64)
    folded = augment.reflect_coordinates(coords, size, border)
    assert folded.tolist() == padded.astype(float).tolist()


def test_reflected_coordinates_refuse_an_unknown_border():
    with refused("unknown rotation border 'wrap' (choose from zeros, reflect, reflect-101)"):
        augment.reflect_coordinates(torch.zeros(3), 4, "wrap")
    assert augment.reflect_coordinates(torch.tensor([-0.5, 0.5]), 1, "reflect-101").tolist() == [0.0, 0.0]


def test_rescale_and_gamma_shortcuts_and_per_image_factors():
    x = torch.rand(3, 2, 10, 10) * 255
    out = augment.rescale(x, torch.tensor([1.0, 0.5, 1.0]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]) and not torch.equal(out[1], x[1])
    half = torch.nn.functional.interpolate(x[1:2], size=(5, 5), mode="bilinear", align_corners=False)
    back = torch.nn.functional.interpolate(half, size=(10, 10), mode="bicubic", align_corners=False).clamp(0, 255)
    assert torch.allclose(out[1], back[0])
    assert augment.rescale(x, torch.ones(3)) is x
    # int() truncates: 10 * 0.99 -> 9 pixels, not 10
    assert not torch.equal(augment.rescale(x[:1], torch.tensor([0.99])), x[:1])
    gamma = augment.adjust_gamma(x, torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(gamma[0], 255 * (x[0] / 255) ** 2) and torch.equal(gamma[1], x[1])
    assert torch.allclose(augment.adjust_gamma(torch.tensor([[[[300.0, -5.0]]]]), torch.tensor([2.0])),
                          torch.tensor([[[[255.0, 0.0]]]]))  # clipped to [0, 255] first
    assert augment.adjust_gamma(x, torch.ones(3)) is x
    tiny = augment.rescale(x[:1], torch.tensor([0.1]))  # 10 * 0.1 -> 1 pixel: a flat image
    one = torch.nn.functional.interpolate(x[:1], size=(1, 1), mode="bilinear", align_corners=False)
    assert torch.allclose(tiny, one.expand_as(tiny))
    edge = torch.zeros(1, 1, 12, 12)
    edge[..., 6:] = 255  # bicubic overshoots at a sharp edge: clipped to [0, 255]
    shrunk = augment.rescale(edge, torch.tensor([0.7]))
    small = torch.nn.functional.interpolate(edge, size=(8, 8), mode="bilinear", align_corners=False)
    raw = torch.nn.functional.interpolate(small, size=(12, 12), mode="bicubic", align_corners=False)
    assert raw.min() < 0 and raw.max() > 255 and torch.equal(shrunk, raw.clamp(0, 255))


def test_per_image_values_follow_the_images_dtype_and_no_op_values_return_the_input():
    """The per-image factors are moved to the batch's dtype and device (float16 here: on a GPU the
    batch is on the device and the draws are not)."""
    x = (torch.rand(2, 3, 4, 4) * 255).half()
    ones, zeros, gamma = torch.ones(2), torch.zeros(2), torch.tensor([0.8, 1.2])
    assert augment.brightness_contrast(x, gamma, zeros + 0.5).dtype == torch.float16
    assert augment.raw_brightness_contrast(x, gamma, zeros + 0.5).dtype == torch.float16
    assert augment.adjust_gamma(x, gamma).dtype == torch.float16
    assert augment.channel_jitter(x, draws=augment.jitter_draws((2, 3), 0.1, 0.1)).dtype == torch.float16
    assert augment.brightness_contrast(x, ones, zeros) is x and augment.raw_brightness_contrast(x, ones, zeros) is x
    assert augment.rescale(x, ones) is x


def test_photometric_steps_use_the_settings_border_and_space():
    x = torch.rand(1, 2, 9, 9) * 200 + 20
    photo = torch.tensor([[40.0, 1.0, 1.5, 0.0]])
    for border in ROTATE_BORDERS:
        assert torch.equal(augment.raw_photometric(x, photo, AugmentSettings(rotate=40.0, rotate_border=border)),
                           augment.rotate(x, photo[:, 0], border))
    assert torch.equal(augment.raw_photometric(x, photo, None), augment.rotate(x, photo[:, 0], "zeros"))
    raw = AugmentSettings(contrast=0.5, bc_space="raw")
    assert torch.equal(augment.raw_photometric(x, torch.tensor([[0.0, 1.0, 1.5, 0.0]]), raw), (x * 1.5).clamp(0, 255))
    assert torch.equal(augment.normalised_photometric(x, photo, raw), x)
    assert torch.equal(augment.normalised_photometric(x, photo, AugmentSettings(contrast=0.5)), x * 1.5)
    assert torch.equal(augment.normalised_photometric(x, photo, None), x * 1.5)
    assert torch.equal(augment.raw_photometric(x, torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5]]), AugmentSettings(rescale=0.5)),
                       augment.rescale(x, torch.tensor([0.5])))


# --------------------------------------------------------------------------------- refusals


# the numeric domains (bounded fields) are walked by tests/test_flag_bounds.py; these are the choices and pairs
@pytest.mark.parametrize("flag, message", [
    (dict(zoom_mode="area"), "--zoom-interpolation: 'area' is not one of nearest, bilinear"),
    (dict(rotate_border="wrap"), "--rotate-border: 'wrap' is not one of zeros, reflect, reflect-101"),
    (dict(bc_space="hsv"), "--brightness-contrast-space: 'hsv' is not one of normalised, raw"),
    (dict(gamma_range=(1.2, 0.8)), "--gamma-range: need 0 < LO <= HI, got 1.2,0.8"),
    (dict(gamma_range=(0.8, 1.2), gamma=0.1), "--gamma-range and --gamma-aug both draw the gamma: give one"),
])
def test_refused_settings_name_the_flag_and_value(flag, message):
    with refused(message):
        AugmentSettings(**flag)


def test_the_edges_of_each_range_are_allowed():
    AugmentSettings(min_scale=1.0, rotate=0.0, contrast=0.0, prob=0.0, rescale=0.0)
    AugmentSettings(rotate=180.0, prob=1.0, gamma_range=(1.0, 1.0), brightness=0.0, gamma=0.0)
