"""SCLIP (Wang et al., ECCV 2024): correlative self-attention in CLIP's last block.

Published code: github.com/wangf3014/SCLIP (``clip/model.py`` ``VisionTransformer.forward`` and
``custom_attn(csa=True)``; ``clip_segmentor.py``; ``configs/cfg_*.py``). Every block but the last
runs unchanged; in the last, the attention of ``ln_1(x)`` is replaced by the correlative
self-attention ``softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))`` (per head, over all tokens,
class token included), applied to the values, then out_proj. The block keeps its residual and its
feed-forward: ``x + attn``, then ``x + mlp(ln_2(x))``; then ``ln_post`` and ``proj`` on the patch
tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import F
from . import register_method
from .base import MethodSpec, NoOptions, Windows

if TYPE_CHECKING:
    import torch as torch_


def correlative_attention_weights(q: torch_.Tensor, k: torch_.Tensor) -> torch_.Tensor:
    """SCLIP's correlative self-attention: ``softmax(q q^T s) + softmax(k k^T s)``, s = d^-1/2.

    Args:
        q, k: B x H x L x d queries and keys of all tokens.

    Returns:
        B x H x L x L; every row sums to two.
    """
    scale = q.shape[-1] ** -0.5
    return (q @ q.transpose(-2, -1) * scale).softmax(dim=-1) + (k @ k.transpose(-2, -1) * scale).softmax(dim=-1)


def correlative_attention(q: torch_.Tensor, k: torch_.Tensor, v: torch_.Tensor, first: int = 0) -> torch_.Tensor:
    """``correlative_attention_weights(q, k)[..., first:, :] @ v`` without the L x L matrices in memory
    (two fused attentions).

    Args:
        q, k, v: B x H x L x d of all tokens.
        first: the first query row computed (1: patch tokens only, the class token still a key).

    Returns:
        B x H x (L - first) x d.
    """
    return (F.scaled_dot_product_attention(q[:, :, first:], q, v)
            + F.scaled_dot_product_attention(k[:, :, first:], k, v))


def build(options: object):
    def sclip(windows: Windows) -> torch_.Tensor:
        clip = windows.clip
        x = clip.last_block_input(windows.pixels)  # N x (1 + hw) x D
        block = clip.block(-1)
        q, k, v = (block.split_heads(t) for t in block.qkv(block.ln_1(x)))  # N x H x (1 + hw) x d each
        attn = block.merge_heads(correlative_attention(q, k, v, first=1))  # N x hw x D, patch tokens only
        x = x[:, 1:] + block.ls_1(block.out_proj(attn))  # the residual is kept
        x = x + block.ls_2(block.mlp(block.ln_2(x)))  # and the feed-forward
        return clip.to_map(clip.project(x), clip.grid(windows.pixels))  # N x E x h x w

    return sclip


def _published(short_side: int, bg_threshold: float = 0.0, logit_scale: float = 40.0, area_threshold: float = 0.0,
               window: int = 224, stride: int = 112) -> dict:
    """One dataset's settings in SCLIP's configs: ``Resize(scale=(2048, short_side))``, the model's
    ``prob_thd``, ``logit_scale`` and ``area_thd``, ``slide_crop`` and ``slide_stride``."""
    return {"short_side": short_side, "long_side": 2048, "window": window, "stride": stride,
            "bg_threshold": bg_threshold, "logit_scale": logit_scale, "area_threshold": area_threshold}


SPEC = register_method(MethodSpec(
    name="sclip", title="SCLIP", build=build, options=NoOptions,
    summary="correlative self-attention (q-q plus k-k) in CLIP's last block, residual and feed-forward kept",
    source="wangf3014/SCLIP (clip/model.py, clip_segmentor.py, configs/cfg_*.py); Wang et al., ECCV 2024",
    # clip_segmentor.py CLIPForSegmentation defaults: slide_crop=224, slide_stride=112, logit_scale=40,
    # prob_thd=0, pamr_steps=0 (PAMR off; --refine pamr turns it on with the same dilations (8, 16));
    # forward_slide runs a crop smaller than the window as it is, without padding (pad_multiple 1).
    settings={"window": 224, "stride": 112, "pad_multiple": 1, "logit_scale": 40.0},
    dataset_settings={
        "voc21": _published(336, bg_threshold=0.1, logit_scale=65.0, area_threshold=0.1),  # configs/cfg_voc21.py
        "voc20": _published(336),  # configs/cfg_voc20.py
        "context60": _published(336, bg_threshold=0.1, logit_scale=50.0),  # configs/cfg_context60.py
        "context59": _published(336),  # configs/cfg_context59.py
        "coco_object": _published(336, bg_threshold=0.1, logit_scale=50.0),  # configs/cfg_coco_object.py
        "coco_stuff": _published(448),  # configs/cfg_coco_stuff164k.py
        "cityscapes": _published(560),  # configs/cfg_city_scapes.py (window 224 as every SCLIP config)
        "ade20k": _published(336),  # configs/cfg_ade20k.py
    },
))
