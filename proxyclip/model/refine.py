"""Post-processing of window logits that any method can use (``ProxyCLIPConfig.refine``).

``REFINERS`` maps a name to a function ``refine(pixels, logits) -> logits``: ``pixels`` are the
N x 3 x h x w CLIP-normalised windows, ``logits`` their N x Q x h x w cosine logits at the
window's size; the result has the logits' shape. The segmenter applies it to every batch of
windows before they are averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Refiner = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]

REFINERS: dict[str, Refiner] = {}
