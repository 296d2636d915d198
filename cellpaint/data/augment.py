"""Train-time augmentations: what is drawn per sample and how it is applied to images.

Draws come from the per-(seed, epoch, index) generator that `dataset.SiteDataset` hands in;
the functions here apply them to single images or whole batches (on the device, in float).
Two recipes' augmentations live side by side, selected by `AugmentSettings`: the 1st
place's (dihedral flips, zoom crop, per-channel gain/offset) and, off by default, the 41st
place's (rescale, rotation with a reflected border, horizontal/vertical flips, brightness and
contrast on raw intensities, gamma, each applied with a probability).
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from cellpaint.core.settings import ROTATE_BORDERS, ZOOM_MODES, AugmentSettings


def jitter_draws(shape: tuple[int, ...], scale_std: float, bias_std: float,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Per-channel gains N(1, scale_std) and offsets N(0, bias_std) as [..., 2, C] (`shape` = (..., C))."""
    scale = 1 + scale_std * torch.randn(shape, generator=generator, device=device)
    bias = bias_std * torch.randn(shape, generator=generator, device=device)
    return torch.stack([scale, bias], dim=-2)


def channel_jitter(x: torch.Tensor, scale_std: float = 0.0, bias_std: float = 0.0,
                   generator: torch.Generator | None = None, draws: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel random gain N(1, scale_std) and offset N(0, bias_std) on normalised images.

    `draws` [..., 2, C] (from `jitter_draws`) gives the gains and offsets instead of drawing them.
    """
    if draws is None:
        if scale_std == 0 and bias_std == 0:
            return x
        draws = jitter_draws(x.shape[:-2], scale_std, bias_std, generator, x.device)
    draws = draws.to(x)
    return x * draws[..., 0, :, None, None] + draws[..., 1, :, None, None]


# -------------------------------------------------------------------------------------- geometry


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/transposes of the last two dims (k = 0 is the identity).

    Bit 0 flips the width, bit 1 the height, bit 2 then transposes: the 1st place's order, so
    the first n TTA views (n < 8) are the same views as the original's.
    """
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-2, -1)
    return x


def draw_zoom_box(rng: np.random.Generator, h: int, w: int, min_scale: float) -> tuple[int, int, int, int]:
    """A random window (top, left, height, width) whose edge is a whole number of pixels drawn
    uniformly from [round(min_scale * edge), edge], placed uniformly: the 1st place's draw.

    On non-square images the width follows the height's scale. Draws nothing (and returns the
    whole image) when `min_scale` >= 1.
    """
    if min_scale >= 1:
        return 0, 0, h, w
    ch = int(rng.integers(max(1, round(h * min_scale)), h + 1))
    cw = w if ch == h else max(1, min(w, round(w * ch / h)))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return int(top), int(left), ch, cw


def zoom(img: torch.Tensor, box: tuple[int, int, int, int], mode: str = "nearest") -> torch.Tensor:
    """The window `box` of `img` [..., H, W] resized back to H x W.

    "nearest" (the 1st place's cv2 INTER_NEAREST on uint8): output pixel i takes crop pixel
    floor(i * crop / H), by integer indexing, so values are copied, never blended, and zoomed
    training images stay as sharp as the (never zoomed) test images. "bilinear": antialiased
    bilinear in float, smoother.
    """
    h, w = img.shape[-2:]
    top, left, ch, cw = box
    crop = img[..., top:top + ch, left:left + cw]
    if (ch, cw) == (h, w):
        return crop
    if mode == "nearest":
        rows = torch.arange(h, device=img.device) * ch // h
        cols = torch.arange(w, device=img.device) * cw // w
        return crop[..., rows[:, None], cols]
    if mode == "bilinear":
        return TF.resize(crop, [h, w], antialias=True)
    raise ValueError(f"unknown zoom interpolation {mode!r} (choose from {', '.join(ZOOM_MODES)})")


def apply_geometry(x: torch.Tensor, geometry: torch.Tensor, zoom_mode: str = "nearest") -> torch.Tensor:
    """Per-sample flips/transposes and zoom crops of a batch [B, C, H, W].

    `geometry` [B, 5] holds (k, top, left, height, width) per sample: the dihedral transform k,
    then the window of the transformed image that is resized back to full size. Transposes of
    non-square images change their shape, so a batch of those cannot be stacked (as before).
    """
    rows = geometry.tolist()
    h, w = x.shape[-2:]
    if all(r == [0, 0, 0, h, w] for r in rows):
        return x
    return torch.stack([zoom(dihedral(img, r[0]), r[1:], zoom_mode) for img, r in zip(x, rows)])


def reflect_coordinates(coord: torch.Tensor, size: int, border: str) -> torch.Tensor:
    """Pixel coordinates (pixel centres at 0 .. size-1) folded back into the image.

    "reflect-101" mirrors about the outermost pixel centres (cv2.BORDER_REFLECT_101, the 41st
    place's rotation border: ...c b | a b c ... the edge pixel is not repeated); "reflect"
    mirrors about the outer pixel edges (cv2.BORDER_REFLECT: ...b a | a b ...). Bilinear
    interpolation at a folded coordinate equals interpolation of the mirrored image, because
    mirroring is linear between neighbouring pixels.
    """
    if border == "reflect-101":
        period = 2 * max(size - 1, 1)
        c = coord.abs() % period
        return torch.where(c > size - 1, period - c, c).clamp(0, size - 1)
    if border == "reflect":
        u = (coord + 0.5).abs() % (2 * size)
        return (torch.where(u > size, 2 * size - u, u) - 0.5).clamp(0, size - 1)
    raise ValueError(f"unknown rotation border {border!r} (choose from {', '.join(ROTATE_BORDERS)})")


def _reflected_grid(grid: torch.Tensor, h: int, w: int, border: str) -> torch.Tensor:
    """An `affine_grid` (align_corners=False) folded into the image, as align_corners=True coordinates."""
    out = []
    for axis, size in ((0, w), (1, h)):  # grid[..., 0] is x (width), grid[..., 1] is y (height)
        pixel = ((grid[..., axis] + 1) * size - 1) / 2
        pixel = reflect_coordinates(pixel, size, border)
        out.append(pixel * 2 / max(size - 1, 1) - 1)
    return torch.stack(out, -1)


def rotate(x: torch.Tensor, degrees: torch.Tensor, border: str = "zeros") -> torch.Tensor:
    """Each image of a batch [B, C, H, W] rotated about its centre by `degrees` [B], same H x W.

    Bilinear. `border` fills the corners: "zeros" (the dark background of fluorescence images),
    or the image mirrored ("reflect", "reflect-101", see `reflect_coordinates`). A positive
    angle turns the image the way ``torch.rot90(x, 1, (-2, -1))`` does. One `grid_sample` for
    the whole batch.
    """
    if not degrees.any():
        return x
    h, w = x.shape[-2:]
    a = torch.deg2rad(degrees.detach().cpu().double())  # a few numbers: on the CPU (MPS has no float64)
    cos, sin = torch.cos(a), torch.sin(a)
    # the grid is in coordinates normalised to [-1, 1] per axis: rescale so that non-square images
    # turn rigidly in pixel space (sample at R·p for output pixel p, both relative to the centre)
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(a)], -1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(a)], -1)], -2).to(x)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    if border == "zeros":
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    grid = _reflected_grid(grid, h, w, border)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def rescale(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image of a raw batch [B, C, H, W] resized to (int(H·s), int(W·s)) (bilinear) and back
    to H x W (bicubic, clipped to [0, 255] as on uint8), s = `factors` [B].

    A resolution jitter, not a zoom: what the 41st place's RandomScale did, since its pipeline
    resized every image back to full size afterwards. Per image (the sizes differ).
    """
    if bool((factors == 1).all()):
        return x
    h, w = x.shape[-2:]
    out = []
    for img, s in zip(x, factors.tolist()):
        if s != 1:
            size = (max(1, int(h * s)), max(1, int(w * s)))  # int() truncates, as cv2's caller did
            small = torch.nn.functional.interpolate(img[None], size=size, mode="bilinear", align_corners=False)
            img = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)[0]
            img = img.clamp(0, 255)
        out.append(img)
    return torch.stack(out)


def resize_batch(x: torch.Tensor, edge: int) -> torch.Tensor:
    """A batch [B, C, H, W] resized so that its longer side is `edge` pixels, aspect kept (bilinear,
    antialiased when shrinking): --image-size-schedule's progressive resizing. Unchanged at that size."""
    h, w = x.shape[-2:]
    size = (max(1, round(h * edge / max(h, w))), max(1, round(w * edge / max(h, w))))
    if size == (h, w):
        return x
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                           antialias=edge < max(h, w))


def adjust_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """255·(x/255)^gamma per image of a batch [B, C, H, W] of raw intensities, `gamma` [B]."""
    if bool((gamma == 1).all()):
        return x
    return 255 * (x / 255).clamp(0, 1) ** gamma.to(x)[:, None, None, None]


def brightness_contrast(x: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
    """x·contrast + brightness, one value per image of a normalised batch [B, C, H, W] (all channels).

    Applied after normalisation: `sample` normalisation divides out any per-image affine change of
    the raw intensities, so before it these would do nothing.
    """
    if bool((contrast == 1).all() and (brightness == 0).all()):
        return x
    return x * contrast.to(x)[:, None, None, None] + brightness.to(x)[:, None, None, None]


def raw_brightness_contrast(x: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
    """clip(x·contrast + brightness·mean(x), 0, 255) per image of a raw batch [B, C, H, W].

    The 41st place's brightness/contrast (albumentations 0.3.0 on uint8): the offset is a
    fraction of the image's mean intensity over all channels and pixels, taken before the
    contrast factor. Only meaningful with a fixed normalisation (`global`, `experiment`):
    `sample` normalisation divides any per-image affine change out again.
    """
    if bool((contrast == 1).all() and (brightness == 0).all()):
        return x
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x * contrast.to(x)[:, None, None, None] + brightness.to(x)[:, None, None, None] * mean).clamp(0, 255)


def draw_photometric(settings: AugmentSettings, rng: np.random.Generator) -> torch.Tensor:
    """float32 [4] (angle in degrees, gamma, contrast, brightness), [5] with the rescale factor
    when `rescale` is on: one sample's draws, neutral where a coin of `prob` said no.

    Always the same four draws first, whichever are on: switching one on does not change the
    others' values; the rescale factor and the coins are drawn after them, and only when used.
    """
    u = rng.uniform(-1, 1, 4)
    gamma = np.exp(np.log1p(settings.gamma) * u[1])
    if settings.gamma_range is not None:  # the 41st place: 255·(x/255)^(1/γ), γ uniform in the range
        lo, hi = settings.gamma_range
        gamma = 1 / (lo + (hi - lo) * (u[1] + 1) / 2)
    values = [settings.rotate * u[0], gamma, 1 + settings.contrast * u[2], settings.brightness * u[3]]
    if settings.rescale > 0:
        values.append(1 + settings.rescale * rng.uniform(-1, 1))
    if settings.prob < 1:
        # one coin each for rotation, gamma, brightness+contrast (one transform in the 41st
        # place's pipeline), rescale; a failed coin leaves the neutral value
        rotate_on, gamma_on, bc_on, rescale_on = rng.random(4) < settings.prob
        neutral = [0.0, 1.0, 1.0, 0.0, 1.0]
        keep = [rotate_on, gamma_on, bc_on, bc_on, rescale_on]
        values = [v if k else n for v, k, n in zip(values, keep, neutral)]
    return torch.tensor(values, dtype=torch.float32)


def raw_photometric(x: torch.Tensor, photo: torch.Tensor, settings: AugmentSettings | None) -> torch.Tensor:
    """The photometric steps on raw intensities of a batch [B, C, H, W]: rescale, rotation,
    brightness/contrast (in "raw" space), gamma. `photo` [B, 4 or 5] from `draw_photometric`."""
    border = settings.rotate_border if settings else "zeros"
    if photo.shape[1] > 4:
        x = rescale(x, photo[:, 4])
    x = rotate(x, photo[:, 0], border)
    if settings is not None and settings.bc_space == "raw":
        x = raw_brightness_contrast(x, photo[:, 2], photo[:, 3])
    return adjust_gamma(x, photo[:, 1])


def normalised_photometric(x: torch.Tensor, photo: torch.Tensor, settings: AugmentSettings | None) -> torch.Tensor:
    """The photometric steps after normalisation: brightness/contrast in "normalised" space."""
    if settings is not None and settings.bc_space == "raw":
        return x
    return brightness_contrast(x, photo[:, 2], photo[:, 3])
