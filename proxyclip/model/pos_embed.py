"""Resizing of learned absolute positional embeddings to a new patch grid.

ProxyCLIP's published runs resize CLIP's and DINO's embeddings with the original DINO recipe
(bicubic, no antialiasing, ``scale_factor = (n + 0.1) / N``); MAE's with its own recipe (bicubic
to the exact size, no antialiasing). open_clip's and timm's own resizers antialias, which gives
different numbers, so the recipes live here. Other methods' published code resizes CLIP's
embedding its own way: GEM with timm's ``resample_abs_pos_embed`` ("antialias": bicubic to the
exact size, antialiased), CLIPSurgery bilinearly ("bilinear": to the exact size, no antialiasing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# recipe -> (interpolation mode, antialias, in the embedding's own dtype (else fp32)) of the recipes
# that resize to the exact grid: MAE's in fp32; GEM's and CLIPSurgery's in the model's dtype
POS_RECIPES = {
    "exact": ("bicubic", False, False),
    "antialias": ("bicubic", True, True),
    "bilinear": ("bilinear", False, True),
}


def _square_grid(pos: torch.Tensor) -> int:
    side = math.isqrt(pos.shape[0])
    if side * side != pos.shape[0]:
        raise ValueError(f"positional embedding of {pos.shape[0]} patches is not a square grid")
    return side


def resize_patch_pos_embed(
    pos: torch.Tensor, grid: tuple[int, int], recipe: str = "dino"
) -> torch.Tensor:
    """Resize the patch part of a positional embedding to ``grid``.

    Args:
        pos: N x D embedding of a square grid of N patches (no class token).
        grid: (rows, cols) of the new grid.
        recipe: "dino" (bicubic with ``scale_factor = (n + 0.1) / sqrt(N)``, as DINO and the
            published ProxyCLIP do), "exact" (bicubic to ``grid``, as MAE does), "antialias"
            (bicubic to ``grid`` with antialiasing, as GEM does) or "bilinear" (bilinear to
            ``grid``, as CLIPSurgery does); only "antialias" antialiases (which matters only
            when the grid shrinks).

    Returns:
        rows*cols x D embedding in row-major order; ``pos`` itself when the grid is unchanged.
    """
    side = _square_grid(pos)
    if tuple(grid) == (side, side):
        return pos
    dim = pos.shape[1]
    square = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # 1 x D x N' x N'
    if recipe == "dino":
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        out = F.interpolate(square, scale_factor=scale, mode="bicubic")  # in the embedding's dtype, as DINO does
    elif recipe in POS_RECIPES:
        mode, antialias, own_dtype = POS_RECIPES[recipe]
        source = square if own_dtype else square.float()
        try:
            out = F.interpolate(source, size=tuple(grid), mode=mode, align_corners=False, antialias=antialias)
        except NotImplementedError:  # e.g. antialiased bicubic in bfloat16 on the CPU: in float32
            out = F.interpolate(source.float(), size=tuple(grid), mode=mode, align_corners=False, antialias=antialias)
    else:
        raise ValueError(f"unknown positional-embedding recipe {recipe!r}; use 'dino' or one of {', '.join(POS_RECIPES)}")
    if tuple(out.shape[-2:]) != tuple(grid):
        raise AssertionError(f"resized grid {tuple(out.shape[-2:])} != requested {tuple(grid)}")
    return out.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], dim)  # L x D


def resize_pos_embed_with_cls(
    pos: torch.Tensor, grid: tuple[int, int], recipe: str = "dino"
) -> torch.Tensor:
    """Like :func:`resize_patch_pos_embed` for an embedding whose first row is the class token's.

    Args:
        pos: (1 + N) x D.

    Returns:
        (1 + rows*cols) x D.
    """
    return torch.cat([pos[:1], resize_patch_pos_embed(pos[1:], grid, recipe)], dim=0)
