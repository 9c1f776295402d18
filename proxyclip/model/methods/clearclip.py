"""ClearCLIP (Lan et al., ECCV 2024): CLIP's last block without residual and feed-forward, q-q attention.

Published code: github.com/mc-lan/ClearCLIP (``open_clip/transformer.py``
``VisionTransformer.forward`` with ``ignore_residual=True`` and ``custom_attn(model_type='ClearCLIP')``;
``clearclip_segmentor.py``; ``configs/cfg_*.py``). Every block but the last runs unchanged; the
last contributes only its attention branch: ``out_proj(softmax(q q^T / sqrt(d)) v)`` of ``ln_1(x)``
(per head, over all tokens, class token included), with no residual and no feed-forward; then
``ln_post`` and ``proj`` on the patch tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import F
from . import register_method
from .base import MethodSpec, NoOptions, Windows

if TYPE_CHECKING:
    import torch


def self_self_attention_weights(x: torch.Tensor) -> torch.Tensor:
    """``softmax(x x^T / sqrt(d))`` of B x H x L x d queries (ClearCLIP: x = q): B x H x L x L."""
    return (x @ x.transpose(-2, -1) * x.shape[-1] ** -0.5).softmax(dim=-1)


def build(options: object):
    def clearclip(windows: Windows) -> torch.Tensor:
        clip = windows.clip
        x = clip.last_block_input(windows.pixels)  # N x (1 + hw) x D
        block = clip.block(-1)
        q, _, v = (block.split_heads(t) for t in block.qkv(block.ln_1(x)))  # N x H x (1 + hw) x d
        attn = F.scaled_dot_product_attention(q[:, :, 1:], q, v)  # N x H x hw x d: q-q attention, patch rows
        z = clip.project(block.out_proj(block.merge_heads(attn)))  # N x hw x E: no residual, no feed-forward
        return clip.to_map(z, clip.grid(windows.pixels))  # N x E x h x w

    return clearclip


def _published(bg_threshold: float = 0.0, window: int = 448, stride: int = 224) -> dict:
    """One dataset's settings in ClearCLIP's configs: ``Resize(scale=(2048, 448))`` everywhere, the
    model's ``prob_thd``, ``slide_crop`` and ``slide_stride``."""
    return {"short_side": 448, "long_side": 2048, "window": window, "stride": stride,
            "bg_threshold": bg_threshold, "logit_scale": 50.0}


SPEC = register_method(MethodSpec(
    name="clearclip", title="ClearCLIP", build=build, options=NoOptions,
    summary="CLIP's last block as its q-q attention branch alone: no residual, no feed-forward",
    source="mc-lan/ClearCLIP (open_clip/transformer.py, clearclip_segmentor.py, configs/cfg_*.py); "
           "Lan et al., ECCV 2024",
    # clearclip_segmentor.py ClearCLIPSegmentation defaults: logit_scale=50, slide_crop=448, slide_stride=224,
    # prob_thd=0; configs/cfg_*.py resize every dataset to short side 448; forward_slide pads a crop whose
    # size is not a multiple of the patch size (compute_padsize, zeros split evenly): pad_multiple 16 (ViT-B/16).
    settings={"window": 448, "stride": 224, "pad_multiple": 16, "logit_scale": 50.0, "short_side": 448},
    dataset_settings={
        "voc21": _published(bg_threshold=0.5),  # configs/cfg_voc21.py
        "voc20": _published(),  # configs/cfg_voc20.py
        "context60": _published(bg_threshold=0.15),  # configs/cfg_context60.py
        "context59": _published(),  # configs/cfg_context59.py
        "coco_object": _published(bg_threshold=0.4),  # configs/cfg_coco_object.py
        "coco_stuff": _published(),  # configs/cfg_coco_stuff164k.py
        "cityscapes": _published(window=224, stride=224),  # configs/cfg_city_scapes.py: slide_crop=224 (stride stays 224)
        "ade20k": _published(),  # configs/cfg_ade20k.py
    },
))
