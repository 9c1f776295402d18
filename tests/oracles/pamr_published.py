"""A literal transcription of the PUBLISHED PAMR, as SCLIP and NACLIP use it. Not for users.

Source: ``pamr.py`` of github.com/wangf3014/SCLIP and github.com/sinahmr/NACLIP (both from
visinf/1-stage-wseg ``models/mods/pamr.py``; the two copies compute the same). Our own code,
written from reading it: the shift kernels are 3 x 3 convolutions over a replicate-padded image,
one per dilation; the affinity of the 8 neighbours is ``-|x - x_n| / (1e-8 + 0.1 std)``, the std
over the 3 x 3 neighbourhoods of all dilations together, averaged over channels and softmaxed
over the neighbours; each iteration replaces the mask by the affinity-weighted sum of the
neighbours' masks (all of them gathered in one B x C x P x H x W tensor, as published).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _kernel_affinity() -> torch.Tensor:
    """``LocalAffinity._init_aff``: 8 x 1 x 3 x 3, centre 1 and one neighbour -1."""
    weight = torch.zeros(8, 1, 3, 3)
    weight[:, 0, 1, 1] = 1
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        weight[i, 0, r, c] = -1
    return weight


def _kernel_copy() -> torch.Tensor:
    """``LocalAffinityCopy._init_aff``: 8 x 1 x 3 x 3, one neighbour 1."""
    weight = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        weight[i, 0, r, c] = 1
    return weight


def _kernel_stdev() -> torch.Tensor:
    """``LocalStDev._init_aff``: 9 x 1 x 3 x 3, every position of the 3 x 3 window."""
    weight = torch.zeros(9, 1, 3, 3)
    for i in range(9):
        weight[i, 0, i // 3, i % 3] = 1
    return weight


def local_affinity(x: torch.Tensor, kernel: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """``LocalAffinity.forward``: B x K x H x W -> B x K x (P * len(dilations)) x H x W."""
    b, k, h, w = x.size()
    x = x.view(b * k, 1, h, w)
    x_affs = []
    for d in dilations:
        x_pad = F.pad(x, [d] * 4, mode="replicate")
        x_affs.append(F.conv2d(x_pad, kernel.to(x.dtype), dilation=d))
    return torch.cat(x_affs, 1).view(b, k, -1, h, w)


def pamr(x: torch.Tensor, mask: torch.Tensor, num_iter: int = 10, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """``PAMR.forward(x, mask)``.

    Args:
        x: B x K x H x W image.
        mask: B x C x h x w logits (resized to H x W, bilinear with aligned corners).

    Returns:
        B x C x H x W.
    """
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = local_affinity(x, _kernel_stdev(), dilations).std(2, keepdim=True)  # LocalStDev
    x = -local_affinity(x, _kernel_affinity(), dilations).abs() / (1e-8 + 0.1 * x_std)  # LocalAffinityAbs
    x = x.mean(1, keepdim=True)
    x = F.softmax(x, 2)
    for _ in range(num_iter):
        m = local_affinity(mask, _kernel_copy(), dilations)  # B x C x P x H x W
        mask = (m * x).sum(2)
    return mask
