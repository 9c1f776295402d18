"""NACLIP (Hajimiri et al., WACV 2025): neighbourhood attention in a reduced last block of CLIP.

Published code: github.com/sinahmr/NACLIP (``clip/model.py`` ``VisionTransformer.forward`` with
``arch='reduced'`` and ``custom_attn`` with ``attn_strategy='naclip'``; ``naclip.py``;
``configs/cfg_*.py``; ``test_all.sh``). Every block but the last runs unchanged; the last is
reduced to its attention branch, ``out_proj(softmax(k k^T / sqrt(d) + omega) v)`` of ``ln_1(x)``
(per head, over all tokens, class token included), with no residual and no feed-forward; then
``ln_post`` and ``proj`` on the patch tokens. ``omega`` adds to the similarity of two patches a
Gaussian of their distance on the patch grid, ``exp(-|p_i - p_j|^2 / (2 std^2))`` (0 for the class
token), so that each patch attends to its neighbourhood.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..._lazy import F, torch
from . import register_method
from .base import MethodSpec, Windows

if TYPE_CHECKING:
    import torch as torch_


@dataclass(frozen=True)
class NACLIPOptions:
    gaussian_std: float = field(default=5.0, metadata={
        "help": "standard deviation, in patches, of the Gaussian neighbourhood added to the attention "
                "(NACLIP: 5, naclip.py gaussian_std=5. and test_all.sh)"})

    def __post_init__(self) -> None:
        if not self.gaussian_std > 0:
            from ...errors import ProxyCLIPError

            raise ProxyCLIPError(f"gaussian_std {self.gaussian_std} must be positive")


def neighbourhood_bias(grid: tuple[int, int], std: float, dtype: torch_.dtype | None = None,
                       device: torch_.device | str | None = None) -> torch_.Tensor:
    """NACLIP's ``omega``: the Gaussian of the distance between patches, added to the attention logits.

    Args:
        grid: (h, w) patch grid; tokens are the class token, then the patches row by row.
        std: the Gaussian's standard deviation in patches.

    Returns:
        (1 + h*w) x (1 + h*w): ``exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 std^2))`` between patches,
        0 in the class token's row and column.
    """
    h, w = grid
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)  # hw
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)  # hw
    dist2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2  # hw x hw
    omega = F.pad(torch.exp(-dist2 / (2 * std**2)), (1, 0, 1, 0))  # (1 + hw) x (1 + hw)
    return omega if dtype is None else omega.to(dtype)


def neighbourhood_attention_weights(k: torch_.Tensor, omega: torch_.Tensor) -> torch_.Tensor:
    """``softmax(k k^T / sqrt(d) + omega)`` of B x H x L x d keys: B x H x L x L."""
    return (k @ k.transpose(-2, -1) * k.shape[-1] ** -0.5 + omega).softmax(dim=-1)


def build(options: NACLIPOptions):
    def naclip(windows: Windows) -> torch_.Tensor:
        clip = windows.clip
        grid = clip.grid(windows.pixels)
        x = clip.last_block_input(windows.pixels)  # N x (1 + hw) x D
        block = clip.block(-1)
        _, k, v = (block.split_heads(t) for t in block.qkv(block.ln_1(x)))  # N x H x (1 + hw) x d
        omega = neighbourhood_bias(grid, options.gaussian_std, k.dtype, k.device)[1:]  # hw x (1 + hw)
        attn = F.scaled_dot_product_attention(k[:, :, 1:], k, v, attn_mask=omega)  # N x H x hw x d
        z = clip.project(block.out_proj(block.merge_heads(attn)))  # N x hw x E: no residual, no feed-forward
        return clip.to_map(z, grid)  # N x E x h x w

    return naclip


WHOLE_IMAGE = 2048  # a window no resized image exceeds (long side <= 2048): slide_crop=0, one pass per image


def _published(short_side: int = 336, bg_threshold: float = 0.0, window: int = 224, stride: int = 112) -> dict:
    """One dataset's settings in NACLIP's configs: ``Resize(scale=(2048, short_side))``, the model's
    ``prob_thd``, ``slide_crop`` and ``slide_stride`` (``slide_crop=0``: the whole image at once)."""
    return {"short_side": short_side, "long_side": 2048, "window": window, "stride": stride,
            "bg_threshold": bg_threshold, "logit_scale": 40.0}


SPEC = register_method(MethodSpec(
    name="naclip", title="NACLIP", build=build, options=NACLIPOptions,
    summary="k-k attention plus a Gaussian neighbourhood in CLIP's last block, no residual, no "
            "feed-forward; PAMR refinement on",
    source="sinahmr/NACLIP (clip/model.py, naclip.py, configs/cfg_*.py, test_all.sh); Hajimiri et al., WACV 2025",
    # naclip.py NACLIP defaults: arch='reduced', attn_strategy='naclip', gaussian_std=5, logit_scale=40,
    # slide_crop=224, slide_stride=112, prob_thd=0, pamr_steps=10 with pamr_stride=(8, 16): PAMR is on in the
    # published results (README: "test_all.sh reduced naclip 5 on"); forward_slide runs a crop smaller than
    # the window as it is, without padding (pad_multiple 1).
    settings={"window": 224, "stride": 112, "pad_multiple": 1, "logit_scale": 40.0, "refine": "pamr"},
    dataset_settings={
        "voc21": _published(bg_threshold=0.1, window=WHOLE_IMAGE, stride=WHOLE_IMAGE),  # configs/cfg_voc21.py: slide_crop=0
        "voc20": _published(window=WHOLE_IMAGE, stride=WHOLE_IMAGE),  # configs/cfg_voc20.py: slide_crop=0
        "context60": _published(bg_threshold=0.1),  # configs/cfg_context60.py
        "context59": _published(),  # configs/cfg_context59.py
        "coco_object": _published(bg_threshold=0.1),  # configs/cfg_coco_object.py
        "coco_stuff": _published(),  # configs/cfg_coco_stuff164k.py (short side 336)
        "cityscapes": _published(short_side=560),  # configs/cfg_city_scapes.py
        "ade20k": _published(),  # configs/cfg_ade20k.py (short side 336)
    },
))
