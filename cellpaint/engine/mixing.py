"""Batch-level training transforms that act on the images and the dense targets together."""
from __future__ import annotations

import numpy as np
import torch

PARTNER_RULES = ("shared", "separate")


def _partners(n: int, rng: np.random.Generator, perm: np.ndarray | None, device) -> torch.Tensor:
    return torch.from_numpy(rng.permutation(n) if perm is None else np.asarray(perm)).to(device)


def mixup(x: torch.Tensor, cell: torch.Tensor, target: torch.Tensor, alpha: float,
          rng: np.random.Generator, perm: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend each sample with a partner (`perm`, else a random permutation): weights
    λ ~ Beta(alpha, alpha), one per sample."""
    if alpha <= 0 or len(x) < 2:
        return x, cell, target
    perm = _partners(len(x), rng, perm, x.device)
    lam = torch.from_numpy(rng.beta(alpha, alpha, len(x)).astype(np.float32)).to(x.device)
    mix = lambda a: lam.view(-1, *[1] * (a.dim() - 1)) * a + (1 - lam.view(-1, *[1] * (a.dim() - 1))) * a[perm]
    return mix(x), mix(cell), mix(target)


def cutmix(x: torch.Tensor, cell: torch.Tensor, target: torch.Tensor, alpha: float,
           rng: np.random.Generator, perm: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a random box from a partner sample (`perm`, else a random permutation); targets
    (and cell types) mix by the pasted area.

    The box's area fraction is 1-λ with λ ~ Beta(alpha, alpha); after clipping to the image the
    weight is recomputed from the box actually pasted, so targets always match the pixels.
    """
    if alpha <= 0 or len(x) < 2:
        return x, cell, target
    h, w = x.shape[-2:]
    lam = rng.beta(alpha, alpha)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    bh, bw = np.sqrt(1 - lam) * h, np.sqrt(1 - lam) * w
    r1, r2 = round(max(0, cy - bh / 2)), round(min(h, cy + bh / 2))
    c1, c2 = round(max(0, cx - bw / 2)), round(min(w, cx + bw / 2))
    if r1 >= r2 or c1 >= c2:
        return x, cell, target
    perm = _partners(len(x), rng, perm, x.device)
    x = x.clone()
    x[..., r1:r2, c1:c2] = x[perm][..., r1:r2, c1:c2]
    kept = 1 - (r2 - r1) * (c2 - c1) / (h * w)
    return x, kept * cell + (1 - kept) * cell[perm], kept * target + (1 - kept) * target[perm]


def mix_batch(x: torch.Tensor, cell: torch.Tensor, target: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
              rng: np.random.Generator, partners: str = "shared") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixup, then cutmix (each off at alpha 0).

    `partners`: "shared" draws one partner permutation for both, first, as the 1st place did, so
    with both on a sample's pasted box comes from the same partner it was blended with;
    "separate" lets each draw its own.
    """
    if partners not in PARTNER_RULES:
        raise ValueError(f"unknown partner rule {partners!r} (choose from {', '.join(PARTNER_RULES)})")
    perm = None
    if partners == "shared" and (mixup_alpha > 0 or cutmix_alpha > 0) and len(x) >= 2:
        perm = rng.permutation(len(x))
    x, cell, target = mixup(x, cell, target, mixup_alpha, rng, perm)
    return cutmix(x, cell, target, cutmix_alpha, rng, perm)
