"""The images of synthetic.py's data sets: what a site looks like given its class (channel profile,
morphology, texture), its experiment (batch effect) and its well and site (jitter, cell positions,
pixel noise). Every draw comes from a generator keyed by names (`keyed_rng`), so each
experiment/plate/well/site draws the same numbers whatever the order. No torch import here.
"""
from __future__ import annotations

import zlib
import numpy as np

from cellpaint.data.synthetic_config import SyntheticConfig, cell_type_of


CHANNELS = 6
# Base appearance per channel (nuclei, ER, actin, RNA/nucleoli, mitochondria, Golgi/membrane), at 48 px.
BASE_SIGMA = np.array([1.8, 3.2, 3.6, 2.0, 3.0, 2.6])        # blob radius (px)
BASE_AMP = np.array([70.0, 38.0, 42.0, 50.0, 38.0, 34.0])     # blob peak intensity (gray levels)
BASE_BACKGROUND = np.array([8.0, 12.0, 10.0, 6.0, 10.0, 8.0])
BASE_GRANULARITY = np.array([0.0, 0.2, 0.1, 0.3, 0.5, 0.4])   # share of a channel drawn as small puncta
PUNCTA_PER_CELL = 4
WELL_JITTER = 0.08                 # well-to-well phenotype spread (log scale) at noise=1


def composite_rgb(img: np.ndarray) -> np.ndarray:
    """A [6, H, W] site as the [3, H, W] RGB composite of the wilds layout: red, green and blue the
    rounded means of stains 1 and 4, 2 and 5, 3 and 6 (a fixed mix that keeps every stain's signal)."""
    x = img.astype(np.uint16)
    return ((x[:3] + x[3:6] + 1) // 2).astype(np.uint8)


def keyed_rng(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator keyed by names, so each experiment/plate/well/site draws the same numbers whatever the order."""
    key = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def class_params(config: SyntheticConfig) -> dict[str, np.ndarray]:
    """Per class: channel profile (log intensity), morphology (size, elongation, density) and texture (granularity).

    Spreads are tuned against the per-well jitter in well_phenotype: at signal=1 a small CNN learns the classes
    in minutes, yet wells of different classes overlap enough that single-well accuracy stays clearly below 100%."""
    K = config.classes + config.positive_controls + 1
    rng, s = keyed_rng(config.seed, "classes"), config.signal
    p = {
        "intensity": rng.normal(0.0, 0.18, (K, CHANNELS)) * s,
        "size": rng.normal(0.0, 0.09, (K, CHANNELS)) * s,
        "elongation": np.abs(rng.normal(0.0, 0.21, (K, CHANNELS))) * s,
        "density": rng.normal(0.0, 0.12, K) * s,
        "granularity": BASE_GRANULARITY + rng.normal(0.0, 0.12, (K, CHANNELS)) * s,
    }
    neg = K - 1  # the negative control is the untreated phenotype: no class effect at all
    for k in ("intensity", "size", "elongation", "density"):
        p[k][neg] = 0.0
    p["granularity"][neg] = BASE_GRANULARITY
    return p


def well_phenotype(cls: dict[str, np.ndarray], k: int, noise: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Class k's phenotype as seen in one well: biology varies from well to well, so sites of a well share an
    error that averaging sites cannot remove (this is what keeps single-well accuracy below 100%)."""
    j = WELL_JITTER * noise
    return {
        "intensity": cls["intensity"][k] + rng.normal(0, j, CHANNELS),
        "size": cls["size"][k] + rng.normal(0, 0.5 * j, CHANNELS),
        "elongation": np.abs(cls["elongation"][k] + rng.normal(0, j, CHANNELS)),
        "density": cls["density"][k] + rng.normal(0, j),
        "granularity": np.clip(cls["granularity"][k] + rng.normal(0, j, CHANNELS), 0.0, 0.9),
    }


def experiment_params(config: SyntheticConfig, experiment: str) -> dict[str, np.ndarray]:
    """Batch effect: a per-cell-type baseline (appearance + gain) times a per-experiment gain and offset."""
    b = config.batch_effect
    ct = keyed_rng(config.seed, "cell_type", cell_type_of(experiment))
    ct_gain, ct_size, ct_density = ct.normal(0, 0.25, CHANNELS) * b, ct.normal(0, 0.10, CHANNELS) * b, ct.normal(0, 0.2) * b
    ex = keyed_rng(config.seed, "batch", experiment)
    return {
        "gain": np.exp(ct_gain + ex.normal(0, 0.20, CHANNELS) * b),
        "offset": BASE_BACKGROUND * np.exp(ex.normal(0, 0.30, CHANNELS) * b),
        "size": ct_size,
        "density": np.asarray(ct_density),
    }


def _render(size: int, cx: np.ndarray, cy: np.ndarray, theta: np.ndarray,
            s_major: np.ndarray, s_minor: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Sum of rotated elliptical Gaussians, (N,) points x (N, C) sigmas/amplitudes -> (C, size, size).

    Each blob is evaluated only on a patch of +-3 sigma around it and scattered with one bincount, so the cost
    grows with the number of cells, not with cells x pixels, and there is no Python loop over pixels or cells."""
    n, c = amp.shape
    if n == 0:
        return np.zeros((c, size, size))
    r = min(int(np.ceil(3.0 * s_major.max())), size)
    off = np.arange(-r, r + 1)
    ix = np.floor(cx).astype(np.int64)[:, None] + off                 # (N, W)
    iy = np.floor(cy).astype(np.int64)[:, None] + off
    # float32 from here: twice as fast, and far more precise than the uint8 it ends in
    dx, dy = (ix + 0.5 - cx[:, None]).astype(np.float32), (iy + 0.5 - cy[:, None]).astype(np.float32)
    cos, sin = np.cos(theta, dtype=np.float32)[:, None, None], np.sin(theta, dtype=np.float32)[:, None, None]
    s_major, s_minor, amp = (v.astype(np.float32) for v in (s_major, s_minor, amp))
    a = dx[:, None, :] * cos + dy[:, :, None] * sin                    # (N, W_y, W_x) along the major axis
    b = dy[:, :, None] * cos - dx[:, None, :] * sin
    q = (a[:, None] / s_major[:, :, None, None]) ** 2 + (b[:, None] / s_minor[:, :, None, None]) ** 2
    val = amp[:, :, None, None] * np.exp(-0.5 * q)                     # (N, C, W, W)
    inside = ((iy >= 0) & (iy < size))[:, :, None] & ((ix >= 0) & (ix < size))[:, None, :]
    flat = iy[:, :, None] * size + ix[:, None, :]
    idx = np.arange(c)[None, :, None, None] * size * size + flat[:, None]
    mask = np.broadcast_to(inside[:, None], idx.shape)
    return np.bincount(idx[mask], weights=val[mask], minlength=c * size * size).reshape(c, size, size)


def render_site(config: SyntheticConfig, pheno: dict[str, np.ndarray], exp: dict[str, np.ndarray],
                rng: np.random.Generator) -> np.ndarray:
    """One site: (6, S, S) uint8 from a well's phenotype, its experiment's batch effect and the per-site generator."""
    S, noise = config.image_size, config.noise
    scale = np.sqrt(S / 48.0)  # cells grow a little with the image, their number grows with the area
    n = rng.poisson(9.0 * (S / 48.0) * np.exp(pheno["density"] + exp["density"]))
    cx, cy = rng.uniform(0, S, n), rng.uniform(0, S, n)
    theta = rng.uniform(0, np.pi, n)
    sigma = (BASE_SIGMA * scale * np.exp(pheno["size"] + exp["size"]))[None] * np.exp(rng.normal(0, 0.15, (n, 1)))
    aspect = np.exp(pheno["elongation"])[None] * np.exp(np.abs(rng.normal(0, 0.1, (n, 1))))
    cell_amp = np.exp(rng.normal(0, 0.25 * noise, (n, 1))) * BASE_AMP * np.exp(pheno["intensity"])
    gran = pheno["granularity"]
    img = _render(S, cx, cy, theta, sigma * np.sqrt(aspect), sigma / np.sqrt(aspect), cell_amp * (1 - gran))
    # Texture: a few small bright puncta scattered inside each cell carry the granular share of each channel.
    m = n * PUNCTA_PER_CELL
    spread = np.repeat(sigma.mean(axis=1), PUNCTA_PER_CELL)
    px = np.repeat(cx, PUNCTA_PER_CELL) + rng.normal(0, 1, m) * spread
    py = np.repeat(cy, PUNCTA_PER_CELL) + rng.normal(0, 1, m) * spread
    ps = np.full((m, CHANNELS), 0.7 * scale)
    img += _render(S, px, py, np.zeros(m), ps, ps, np.repeat(cell_amp * gran * 1.5, PUNCTA_PER_CELL, axis=0))
    img = exp["offset"][:, None, None] + exp["gain"][:, None, None] * img
    img += rng.normal(0, 1, img.shape) * noise * (1.0 + 0.25 * np.sqrt(np.maximum(img, 0)))  # read + shot noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
