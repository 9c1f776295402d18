"""Pixel normalisation of the published protocol: CLIP's input, and the VFM's input built from it.

The published runs (mc-lan/ProxyCLIP, ``proxyclip_segmentor.py``) normalise 0-255 RGB pixels with
MMSegmentation's data-preprocessor constants, which are CLIP's constants x 255 rounded to three
decimals, and build every VFM's input from those normalised pixels: "un-normalised" with CLIP's
exact 0-1 constants (not an exact inverse of the rounded ones), then normalised with ImageNet's
constants (``transforms.Normalize``), for DINO, DINOv2, SAM and MAE alike. The differences are
~1e-5 on the inputs, enough to flip entries of eq. 7's mask; so the constants live here, once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# CLIP's input: (pixels_0_255 - mean) / std, SegDataPreProcessor(mean=..., std=...) of the published segmentor.
PUBLISHED_CLIP_MEAN_255 = (122.771, 116.746, 104.094)
PUBLISHED_CLIP_STD_255 = (68.501, 66.632, 70.323)
# CLIP's exact 0-1 constants (OpenAI; open_clip's OPENAI_DATASET_MEAN/STD): the published UnNormalize.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The VFMs' input: the published transforms.Normalize, ImageNet's constants, for every VFM.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def clip_input_constants(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The 0-255 mean and std that normalise CLIP's input, given CLIP's own 0-1 constants.

    For CLIPs with OpenAI's constants (every CLIP of the paper, ViT-H/14 LAION included) these
    are the published, rounded ones; any other CLIP gets its own constants x 255.
    """
    if tuple(float(m) for m in mean) == OPENAI_CLIP_MEAN and tuple(float(s) for s in std) == OPENAI_CLIP_STD:
        return PUBLISHED_CLIP_MEAN_255, PUBLISHED_CLIP_STD_255
    return tuple(255.0 * float(m) for m in mean), tuple(255.0 * float(s) for s in std)


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(tuple(values), dtype=like.dtype, device=like.device).view(3, 1, 1)  # 3 x 1 x 1


def normalise_clip_input(
    pixels: torch.Tensor, mean_255: Sequence[float], std_255: Sequence[float]
) -> torch.Tensor:
    """CLIP's input from 0-255 pixels, in float32, as the published data preprocessor computes it.

    Args:
        pixels: ... x 3 x H x W, uint8 (or float holding 0-255 values), RGB.
        mean_255, std_255: from :func:`clip_input_constants`.

    Returns:
        ... x 3 x H x W float32, ``(pixels - mean) / std``.
    """
    x = pixels.float()  # ... x 3 x H x W
    return (x - _column(mean_255, x)) / _column(std_255, x)


def clip_to_vfm_input(
    windows: torch.Tensor,
    clip_mean: Sequence[float],
    clip_std: Sequence[float],
    vfm_mean: Sequence[float],
    vfm_std: Sequence[float],
) -> torch.Tensor:
    """A VFM's input from CLIP-normalised pixels, as published: ``norm(unnorm(x))``.

    Un-normalised with CLIP's 0-1 constants (``x * std + mean``, two roundings as the published
    in-place ``mul_``/``add_``), then ``(x - vfm_mean) / vfm_std``; padding included.

    Args:
        windows: N x 3 x h x w (or 3 x h x w) CLIP-normalised, any float dtype (kept).
        clip_mean, clip_std: CLIP's 0-1 constants (:data:`OPENAI_CLIP_MEAN`, :data:`OPENAI_CLIP_STD`).
        vfm_mean, vfm_std: the VFM's 0-1 constants (ImageNet's for every published VFM).

    Returns:
        the same shape and dtype, normalised for the VFM (computed in float32, as published).
    """
    x = windows.float()
    pixels = x * _column(clip_std, x) + _column(clip_mean, x)  # 0-1 range
    return ((pixels - _column(vfm_mean, x)) / _column(vfm_std, x)).to(windows.dtype)
