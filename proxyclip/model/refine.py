"""Post-processing of an image's logits that any method can use (``ProxyCLIPConfig.refine``).

``REFINERS`` maps a name to a function ``refine(pixels, logits) -> logits``: ``pixels`` are
N x 3 x H x W CLIP-normalised images, ``logits`` their N x Q x H x W cosine logits at the same
size; the result has the logits' shape. The segmenter applies it to each image's averaged window
logits at the output size (the original image's, in ``segment`` and ``eval``), with the resized
image interpolated (bilinear) to that size: what SCLIP's and NACLIP's published code does
(``forward_slide`` / ``predict``: ``F.interpolate(img, size=ori_shape)``, then ``self.pamr(img,
logits)``).

PAMR (pixel-adaptive mask refinement; Araslanov & Roth, CVPR 2020) is registered as ``"pamr"``
with the parameters of NACLIP's published runs: 10 iterations, dilations (8, 16)
(sinahmr/NACLIP ``naclip.py``: ``pamr_steps=10, pamr_stride=(8, 16)``, on in its main results;
wangf3014/SCLIP ``clip_segmentor.py`` has the same dilations with ``pamr_steps=0``, i.e. off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from .._lazy import F, torch

if TYPE_CHECKING:
    import torch as torch_

Refiner = Callable[["torch_.Tensor", "torch_.Tensor"], "torch_.Tensor"]

REFINERS: dict[str, Refiner] = {}

# The 8 neighbours of a 3 x 3 neighbourhood (row, column offsets in units of the dilation), in the
# order of the published ``LocalAffinity`` kernels (1-stage-wseg ``pamr.py``, copied by SCLIP and NACLIP).
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
WINDOW = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))  # LocalStDev's 3 x 3
PAMR_ITERATIONS = 10  # NACLIP naclip.py: pamr_steps=10 (eval.py --pamr on: 10)
PAMR_DILATIONS = (8, 16)  # NACLIP naclip.py and SCLIP clip_segmentor.py: pamr_stride=(8, 16)


def _shifted(x: torch_.Tensor, offsets: Sequence[tuple[int, int]], dilation: int) -> list[torch_.Tensor]:
    """``x`` (B x C x H x W) read at each offset times ``dilation``, borders replicated."""
    height, width = x.shape[-2:]
    padded = F.pad(x, [dilation] * 4, mode="replicate")  # B x C x (H + 2d) x (W + 2d)
    return [padded[..., dilation + dy * dilation: dilation + dy * dilation + height,
                   dilation + dx * dilation: dilation + dx * dilation + width] for dy, dx in offsets]


def pamr_affinity(pixels: torch_.Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> torch_.Tensor:
    """PAMR's pixel-adaptive affinities: how much each pixel takes from each of its neighbours.

    For every dilation d, the 8 neighbours at distance d; a neighbour's weight is the softmax over
    all neighbours of ``-mean_c |x_c - n_c| / (1e-8 + 0.1 * std_c)``, std_c the (unbiased) standard
    deviation of channel c over the 3 x 3 neighbourhoods of every dilation taken together
    (centre included once per dilation).

    Args:
        pixels: B x 3 x H x W float (any per-channel affine normalisation gives the same weights,
            up to the 1e-8).

    Returns:
        B x P x H x W weights (P = 8 per dilation) that sum to one over P.
    """
    x = pixels.float()
    around = [n for d in dilations for n in _shifted(x, WINDOW, d)]  # 9 * len(dilations) x [B x 3 x H x W]
    std = torch.stack(around, dim=2).std(dim=2)  # B x 3 x H x W over the 9 * len(dilations) values
    neighbours = [n for d in dilations for n in _shifted(x, NEIGHBOURS, d)]  # P x [B x 3 x H x W]
    diff = torch.stack([(x - n).abs() for n in neighbours], dim=2)  # B x 3 x P x H x W
    logits = (-diff / (1e-8 + 0.1 * std[:, :, None])).mean(dim=1)  # B x P x H x W
    return logits.softmax(dim=1)


def pamr(
    pixels: torch_.Tensor,
    logits: torch_.Tensor,
    iterations: int = PAMR_ITERATIONS,
    dilations: Sequence[int] = PAMR_DILATIONS,
) -> torch_.Tensor:
    """Pixel-adaptive mask refinement: ``iterations`` times, each pixel's logits become the
    affinity-weighted sum of its neighbours' (:func:`pamr_affinity`).

    Args:
        pixels: B x 3 x H x W, CLIP-normalised.
        logits: B x Q x H' x W' (resized bilinearly, corners aligned, to H x W if they differ, as published).

    Returns:
        B x Q x H x W float32 refined logits.
    """
    height, width = pixels.shape[-2:]
    mask = logits.float()
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=True)
    weights = pamr_affinity(pixels, dilations)  # B x P x H x W
    for _ in range(iterations):
        neighbours = [n for d in dilations for n in _shifted(mask, NEIGHBOURS, d)]  # P x [B x Q x H x W]
        out = neighbours[0] * weights[:, None, 0]
        for p in range(1, len(neighbours)):
            out.addcmul_(neighbours[p], weights[:, None, p])  # B x Q x H x W, no temporary
        mask = out
    return mask


def refine_image_logits(name: str, image: torch_.Tensor, logits: torch_.Tensor) -> torch_.Tensor:
    """Refine one image's logits with ``REFINERS[name]``.

    Args:
        image: 3 x h x w CLIP-normalised (the resized image the windows were cut from).
        logits: Q x H x W averaged window logits at the output size.

    Returns:
        Q x H x W float32: the refiner's output, given the image interpolated bilinearly to H x W.
    """
    pixels = F.interpolate(image[None].float(), size=tuple(logits.shape[-2:]), mode="bilinear", align_corners=False)
    return REFINERS[name](pixels, logits[None].float())[0]


REFINERS["pamr"] = partial(pamr, iterations=PAMR_ITERATIONS, dilations=PAMR_DILATIONS)
