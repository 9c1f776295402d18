import math

import pytest
import torch
import torch.nn.functional as F

from proxyclip.model.pos_embed import resize_patch_pos_embed, resize_pos_embed_with_cls


def test_unchanged_grid_returns_the_embedding():
    pos = torch.randn(1 + 196, 8)
    torch.testing.assert_close(resize_pos_embed_with_cls(pos, (14, 14)), pos, rtol=0, atol=0)


def test_dino_recipe_uses_offset_scale_factor_without_antialias():
    torch.manual_seed(0)
    pos = torch.randn(196, 8)
    out = resize_patch_pos_embed(pos, (21, 21), "dino")
    square = pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(square, scale_factor=(21.1 / 14, 21.1 / 14), mode="bicubic")
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1).reshape(-1, 8))
    # and it differs from resizing to the exact size (what open_clip / timm do)
    exact = F.interpolate(square, size=(21, 21), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(-1, 8)
    assert (out - exact).abs().max() > 1e-3


def test_non_square_grid_is_row_major():
    pos = torch.arange(16.0).view(16, 1).repeat(1, 2)  # 4 x 4 grid, value = row * 4 + col
    out = resize_patch_pos_embed(pos, (2, 6), "exact").view(2, 6, 2)
    assert out[0, 0, 0] < out[1, 0, 0]  # rows increase downward
    assert out[0, 0, 0] < out[0, 5, 0]
    assert out.shape == (2, 6, 2)


def test_rejects_non_square_embedding_and_unknown_recipe():
    with pytest.raises(ValueError):
        resize_patch_pos_embed(torch.zeros(10, 2), (3, 3))
    with pytest.raises(ValueError):
        resize_patch_pos_embed(torch.zeros(16, 2), (3, 3), "nearest")


@pytest.mark.parametrize("n", [17, 21, 24, 42])
def test_dino_recipe_reaches_every_grid(n):
    for side in (14, 16, 28):
        out = resize_patch_pos_embed(torch.zeros(side * side, 2), (n, n), "dino")
        assert out.shape == (n * n, 2)
        assert math.isqrt(out.shape[0]) == n
