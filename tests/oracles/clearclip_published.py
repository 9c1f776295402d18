"""A deliberately straightforward transcription of the PUBLISHED ClearCLIP inference. Not for users.

The test oracle of ``proxyclip.model.methods.clearclip`` and the "published code" baseline of
``benchmarks/bench_methods.py``: one window at a time, attention matrices per head with ``bmm``.

What is transcribed (github.com/mc-lan/ClearCLIP, our own code written from reading it):
``open_clip/transformer.py`` ``VisionTransformer.forward(x, model_type, ignore_residual,
last_n_layers=1)``, ``interpolate_pos_encoding``, ``custom_attn`` (every ``model_type``: vanilla,
MaskCLIP, SCLIP, ClearCLIP) and ``_global_pool``; ``clearclip_segmentor.py`` ``forward_feature``,
``forward_slide`` with ``compute_padsize``, and ``postprocess_result``. The ClearCLIP repository
runs vanilla CLIP, MaskCLIP and SCLIP under one protocol too, which makes this a second reading of
SCLIP's attention (``model_type='SCLIP', ignore_residual=False`` is the SCLIP block).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def interpolate_pos_encoding(visual: nn.Module, num_tokens: int, height: int, width: int) -> torch.Tensor:
    """``VisionTransformer.interpolate_pos_encoding(x, w, h)`` (``w`` is the height): (1 + rows*cols) x D."""
    pos = visual.positional_embedding
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


def custom_attn(attn_layer: nn.Module, x: torch.Tensor, model_type: str = "ClearCLIP") -> torch.Tensor:
    """The published ``custom_attn``: L x B x D (``ln_1`` of the block's input) -> L x B x D."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim**-0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)  # B*nh x L x hd
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if model_type == "vanilla":
        attn_weights = F.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1)
    elif model_type == "MaskCLIP":
        mask = torch.empty(q.shape[1], q.shape[1], dtype=q.dtype).to(q.device)
        mask.fill_(float("-inf"))
        mask.fill_diagonal_(0)
        attn_weights = F.softmax(mask.unsqueeze(0).repeat(q.shape[0], 1, 1), dim=-1)
    elif model_type == "SCLIP":
        qq_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        kk_attn = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(qq_attn, dim=-1) + F.softmax(kk_attn, dim=-1)
    elif model_type == "ClearCLIP":
        attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
    else:
        raise ValueError(f"unknown model_type {model_type!r}")
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def run_block(visual: nn.Module, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An unchanged block on LND tokens (open_clip >= 2.24 runs its blocks batch-first)."""
    return blk(x.permute(1, 0, 2)).permute(1, 0, 2) if visual.transformer.batch_first else blk(x)


def encode_image(visual: nn.Module, x: torch.Tensor, model_type: str = "ClearCLIP",
                 ignore_residual: bool = True) -> torch.Tensor:
    """``VisionTransformer.forward(x, model_type, ignore_residual, last_n_layers=1)``: B x hw x E
    (the ``tokens`` of ``_global_pool``, class token dropped)."""
    _, _, height, width = x.shape
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # B x hw x D
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    if x.shape[1] != visual.positional_embedding.shape[0]:
        x = x + interpolate_pos_encoding(visual, x.shape[1], height, width).to(x.dtype)
    else:
        x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for blk in visual.transformer.resblocks[:-1]:
        x = run_block(visual, blk, x)
    output = 0
    for blk in visual.transformer.resblocks[-1:]:
        if ignore_residual:
            output += custom_attn(blk.attn, blk.ln_1(x), model_type=model_type)
        else:
            x_out = x + custom_attn(blk.attn, blk.ln_1(x), model_type=model_type)
            x_out = x_out + blk.mlp(blk.ln_2(x_out))
            output += x_out
        x = run_block(visual, blk, x)
    x = output.permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x)
    tokens = x[:, 1:]  # _global_pool, pool_type 'tok'
    return tokens @ visual.proj


def forward_feature(clip_model: nn.Module, img: torch.Tensor, query_features: torch.Tensor,
                    model_type: str = "ClearCLIP", ignore_residual: bool = True) -> torch.Tensor:
    """The published ``forward_feature``: 1 x 3 x H x W -> 1 x Q x H x W cosine logits."""
    image_features = encode_image(clip_model.visual, img, model_type, ignore_residual)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = image_features @ query_features.T
    patch = int(clip_model.visual.conv1.kernel_size[0])
    w, h = img[0].shape[-2] // patch, img[0].shape[-1] // patch
    out_dim = logits.shape[-1]
    logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")


def compute_padsize(height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
    """The published ``compute_padsize``: (left, right, top, bottom) up to a multiple of the patch size."""
    left = right = top = bottom = 0
    if width % patch_size:
        lr = patch_size - (width % patch_size)
        left, right = lr // 2, lr - lr // 2
    if height % patch_size:
        tb = patch_size - (height % patch_size)
        top, bottom = tb // 2, tb - tb // 2
    return left, right, top, bottom


@torch.no_grad()
def forward_slide(clip_model: nn.Module, img: torch.Tensor, query_features: torch.Tensor, out_size: tuple[int, int],
                  stride: int = 224, crop_size: int = 448, model_type: str = "ClearCLIP",
                  ignore_residual: bool = True) -> torch.Tensor:
    """The published ``forward_slide``: windows one at a time, padded to the patch size, averaged,
    resized to the original size. Returns 1 x Q x H0 x W0 cosine logits."""
    batch_size, _, h_img, w_img = img.shape
    patch = int(clip_model.visual.conv1.kernel_size[0])
    h_grids = max(h_img - crop_size + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop_size + stride - 1, 0) // stride + 1
    preds = img.new_zeros((batch_size, query_features.shape[0], h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop_size, h_img), min(x1 + crop_size, w_img)
            y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            height, width = crop_img.shape[2:]
            pad = compute_padsize(height, width, patch)
            if any(pad):
                crop_img = F.pad(crop_img, pad)
            crop_seg_logit = forward_feature(clip_model, crop_img, query_features, model_type, ignore_residual)
            if any(pad):
                left, top = pad[0], pad[2]
                crop_seg_logit = crop_seg_logit[:, :, top:top + height, left:left + width]
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    preds = preds / count_mat
    return F.interpolate(preds, size=tuple(out_size), mode="bilinear")


def postprocess_result(seg_logits: torch.Tensor, query_idx: Sequence[int], logit_scale: float = 50.0,
                       prob_thd: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The published ``postprocess_result`` for one image: labels (H x W) and probabilities (C x H x W)."""
    seg_logits = seg_logits[0] * logit_scale
    seg_logits = seg_logits.softmax(0)
    query_idx_t = torch.as_tensor(list(query_idx), dtype=torch.int64)
    num_cls, num_queries = int(query_idx_t.max()) + 1, len(query_idx_t)
    if num_cls != num_queries:
        seg_logits = seg_logits.unsqueeze(0)
        cls_index = F.one_hot(query_idx_t).T.view(num_cls, num_queries, 1, 1)
        seg_logits = (seg_logits * cls_index).max(1)[0]
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0], seg_logits


def predict_logits(model: nn.Module, image: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int],
                   model_type: str = "ClearCLIP", ignore_residual: bool = True) -> torch.Tensor:
    """:func:`forward_slide` with a :class:`proxyclip.ProxyCLIP`'s modules and window settings.

    Returns:
        Q x H0 x W0, comparable with ``model.predict_logits(image, text, out_size)``.
    """
    cfg = model.config
    assert cfg.pad_multiple == model.clip.patch_size and cfg.refine is None, "ClearCLIP pads to the patch size"
    return forward_slide(model.clip_model, image[None].to(model.device, model.dtype), text.to(model.dtype), out_size,
                         stride=cfg.stride, crop_size=cfg.window, model_type=model_type,
                         ignore_residual=ignore_residual)[0]
