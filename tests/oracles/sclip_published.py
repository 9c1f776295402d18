"""A deliberately straightforward transcription of the PUBLISHED SCLIP inference. Not for users.

The test oracle of ``proxyclip.model.methods.sclip`` and the "published code" baseline of
``benchmarks/bench_methods.py``: one window at a time in a Python loop, the L x L attention
matrices built per head with ``bmm``, as published.

What is transcribed (github.com/wangf3014/SCLIP, our own code written from reading it):
``clip/model.py`` ``VisionTransformer.forward(return_all=True, csa=True)``,
``interpolate_pos_encoding`` and ``custom_attn(csa=True)``; ``clip_segmentor.py``
``forward_feature``, ``forward_slide`` (with its optional PAMR) and ``postprocess_result`` (with
``prob_thd`` and ``area_thd``). The computation runs on an open_clip model's modules (the
published code loads OpenAI's CLIP with its own copy of the same architecture): blocks, layer
norms and linear layers are the modules' own; what SCLIP changes is written out here.

Positional embeddings are resized as published: only when the token count differs from the
embedding's (a grid with the square's token count but another shape, e.g. 7 x 28 for ViT-B/16,
keeps the square's embedding; ``proxyclip`` resizes it, a difference no protocol window reaches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import pamr_published


def interpolate_pos_encoding(visual: nn.Module, num_tokens: int, height: int, width: int) -> torch.Tensor:
    """``VisionTransformer.interpolate_pos_encoding(x, w, h)`` (SCLIP's ``w`` is the height).

    Returns:
        (1 + rows*cols) x D.
    """
    pos = visual.positional_embedding  # (1 + N) x D
    patch = int(visual.conv1.kernel_size[0])
    npatch, n = num_tokens - 1, pos.shape[0] - 1
    if npatch == n and height == width:
        return pos
    dim = pos.shape[-1]
    w0, h0 = height // patch + 0.1, width // patch + 0.1
    patch_pos = F.interpolate(
        pos[1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(-1, dim)
    return torch.cat([pos[[0]], patch_pos], dim=0)


def embed(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The start of the published ``forward``: conv1, class token, positional embedding, ln_pre.

    Args:
        x: B x 3 x H x W.

    Returns:
        (1 + hw) x B x D (LND, as the published blocks run).
    """
    _, _, height, width = x.shape
    x = visual.conv1(x)  # B x D x h x w
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # B x hw x D
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1)  # B x (1 + hw) x D
    if x.shape[1] != visual.positional_embedding.shape[0]:
        x = x + interpolate_pos_encoding(visual, x.shape[1], height, width).to(x.dtype)
    else:
        x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    return x.permute(1, 0, 2)  # LND


def run_block(visual: nn.Module, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An unchanged block on LND tokens (open_clip >= 2.24 runs its blocks batch-first)."""
    return blk(x.permute(1, 0, 2)).permute(1, 0, 2) if visual.transformer.batch_first else blk(x)


def custom_attn(attn_layer: nn.Module, x: torch.Tensor, csa: bool = True) -> torch.Tensor:
    """The published ``custom_attn``: L x B x D (``ln_1`` of the block's input) -> L x B x D."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim**-0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)  # B*nh x L x hd
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if csa:
        q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
    else:
        attn_weights = F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
    attn_output = torch.bmm(attn_weights, v)  # B*nh x L x hd
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)  # L x B x D
    return attn_layer.out_proj(attn_output)


def encode_image(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``VisionTransformer.forward(x, return_all=True, csa=True)``: B x (1 + hw) x E."""
    x = embed(visual, x)
    for blk in visual.transformer.resblocks[:-1]:
        x = run_block(visual, blk, x)
    for blk in visual.transformer.resblocks[-1:]:
        x = x + custom_attn(blk.attn, blk.ln_1(x), csa=True)
        x = x + blk.mlp(blk.ln_2(x))
    x = x.permute(1, 0, 2)  # LND -> NLD
    return visual.ln_post(x) @ visual.proj


def forward_feature(clip_model: nn.Module, img: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
    """The published ``forward_feature``: 1 x 3 x H x W -> 1 x Q x H x W cosine logits."""
    image_features = encode_image(clip_model.visual, img)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    image_features = image_features[:, 1:]
    logits = image_features @ query_features.T  # 1 x hw x Q
    patch_size = int(clip_model.visual.conv1.kernel_size[0])
    w, h = img[0].shape[-2] // patch_size, img[0].shape[-1] // patch_size
    out_dim = logits.shape[-1]
    logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")


@torch.no_grad()
def forward_slide(
    clip_model: nn.Module,
    img: torch.Tensor,
    query_features: torch.Tensor,
    out_size: tuple[int, int],
    stride: int = 112,
    crop_size: int = 224,
    pamr_steps: int = 0,
    pamr_stride: Sequence[int] = (8, 16),
    feature=forward_feature,
) -> torch.Tensor:
    """The published ``forward_slide``: windows one at a time, no padding, averaged, resized to the
    original size, then PAMR if ``pamr_steps`` (``feature``: another method's ``forward_feature``).

    Args:
        img: 1 x 3 x H x W CLIP-normalised (after the protocol's resize).
        out_size: the original (H0, W0).

    Returns:
        1 x Q x H0 x W0 cosine logits.
    """
    batch_size, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop_size + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop_size + stride - 1, 0) // stride + 1
    preds = img.new_zeros((batch_size, query_features.shape[0], h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop_size, h_img), min(x1 + crop_size, w_img)
            y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
            crop_seg_logit = feature(clip_model, img[:, :, y1:y2, x1:x2], query_features)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    preds = preds / count_mat
    logits = F.interpolate(preds, size=tuple(out_size), mode="bilinear")
    if pamr_steps > 0:
        img = F.interpolate(img, size=tuple(out_size), mode="bilinear")
        logits = pamr_published.pamr(img, logits.to(img.dtype), pamr_steps, pamr_stride)
    return logits


def postprocess_result(
    seg_logits: torch.Tensor,
    query_idx: Sequence[int],
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published ``postprocess_result`` for one image: labels (H x W) and probabilities (C x H x W)."""
    seg_logits = seg_logits[0] * logit_scale
    seg_logits = seg_logits.softmax(0)  # Q x H x W
    query_idx_t = torch.as_tensor(list(query_idx), dtype=torch.int64)
    num_cls, num_queries = int(query_idx_t.max()) + 1, len(query_idx_t)
    if num_cls != num_queries:
        seg_logits = seg_logits.unsqueeze(0)
        cls_index = F.one_hot(query_idx_t)
        cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)
        seg_logits = (seg_logits * cls_index).max(1)[0]
    if area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)  # H x W x C
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)  # 1 x 1 x (C - 1)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0], seg_logits


def predict_logits(model: nn.Module, image: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """:func:`forward_slide` with a :class:`proxyclip.ProxyCLIP`'s modules and configuration
    (PAMR with the published 10 iterations and dilations (8, 16) when ``config.refine == "pamr"``).

    Returns:
        Q x H0 x W0, comparable with ``model.predict_logits(image, text, out_size)``.
    """
    cfg = model.config
    assert cfg.method == "sclip" and cfg.pad_multiple == 1, "the published SCLIP does not pad windows"
    return forward_slide(model.clip_model, image[None].to(model.device, model.dtype), text.to(model.dtype), out_size,
                         stride=cfg.stride, crop_size=cfg.window, pamr_steps=10 if cfg.refine == "pamr" else 0)[0]
