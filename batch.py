"""Batch-level training transforms that act on the images and the dense targets together."""
from __future__ import annotations

import numpy as np
import torch


def mixup(x: torch.Tensor, cell: torch.Tensor, target: torch.Tensor, alpha: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend each sample with a random partner: weights λ ~ Beta(alpha, alpha), one per sample."""
    if alpha <= 0 or len(x) < 2:
        return x, cell, target
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    lam = torch.from_numpy(rng.beta(alpha, alpha, len(x)).astype(np.float32)).to(x.device)
    mix = lambda a: lam.view(-1, *[1] * (a.dim() - 1)) * a + (1 - lam.view(-1, *[1] * (a.dim() - 1))) * a[perm]
    return mix(x), mix(cell), mix(target)


def cutmix(x: torch.Tensor, cell: torch.Tensor, target: torch.Tensor, alpha: float,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a random box from a partner sample; targets (and cell types) mix by the pasted area.

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
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    x = x.clone()
    x[..., r1:r2, c1:c2] = x[perm][..., r1:r2, c1:c2]
    kept = 1 - (r2 - r1) * (c2 - c1) / (h * w)
    return x, kept * cell + (1 - kept) * cell[perm], kept * target + (1 - kept) * target[perm]
