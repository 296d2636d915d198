"""augment.resize_batch (--image-size-schedule) against torch's own resize: the longer side to the
edge asked, the aspect kept (rounded, never below one pixel), antialiased when shrinking only,
and the batch itself handed back at its own size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cellpaint.data.augment import resize_batch


def reference(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


@pytest.mark.parametrize("h, w, edge, size", [(48, 40, 24, (24, 20)), (40, 48, 24, (20, 24)), (30, 20, 9, (9, 6)),
                                              (33, 10, 16, (16, 5)), (50, 1, 10, (10, 1)), (100, 3, 10, (10, 1)),
                                              (1, 50, 10, (1, 10)), (3, 100, 10, (1, 10))])
def test_shrinking_keeps_the_aspect_and_antialiases(h, w, edge, size):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    out = resize_batch(x, edge)
    assert out.shape == (2, 3, *size)
    torch.testing.assert_close(out, reference(x, size, antialias=True), rtol=0, atol=0)
    if min(size) > 1:  # the plain bilinear resize skips pixels: another picture
        assert not torch.allclose(out, reference(x, size, antialias=False), atol=1e-3)


@pytest.mark.parametrize("h, w, edge, size", [(12, 8, 24, (24, 16)), (8, 12, 18, (12, 18)), (5, 7, 9, (6, 9))])
def test_growing_is_plain_bilinear(h, w, edge, size):
    x = torch.rand(1, 2, h, w, generator=torch.Generator().manual_seed(edge))
    out = resize_batch(x, edge)
    assert out.shape == (1, 2, *size)
    torch.testing.assert_close(out, reference(x, size, antialias=False), rtol=0, atol=0)


def test_a_batch_at_its_size_is_handed_back():
    x = torch.rand(2, 6, 24, 16)
    assert resize_batch(x, 24) is x
    # one side at the edge, the other rounding to itself: the same batch too
    y = torch.rand(1, 1, 10, 7)
    assert resize_batch(y, 10) is y
