"""A deliberately straightforward transcription of the PUBLISHED GEM inference. Not for users.

The test oracle for :mod:`proxyclip.model.methods.gem` and the "published loop" of
``benchmarks/bench_methods.py``: one window at a time, every step as the published code writes it.

What is transcribed (our own code written from reading it):

- github.com/WalBouss/GEM ``gem/gem_utils.py``: ``resample_abs_pos_embed``,
  ``SelfSelfAttention.forward``, ``GEMResidualBlock.forward``, ``modified_vit_forward``;
  ``gem/gem_wrapper.py`` ``GEMWrapper.apply_gem`` (which blocks are replaced);
- github.com/mc-lan/ClearCLIP ``clearclip_segmentor.py`` ``forward_feature`` (``model_type='GEM'``:
  the GEM path's patch tokens, normalised, cosine with the text) and ``forward_slide`` (windows
  padded to the patch size), and its ``gem`` copy's ``ignore_residual`` switch
  (``GEMResidualBlock``: ``x_gem = x_gem_res``).

The published code replaces modules of the CLIP model in place; here the same computation runs
as functions on an open_clip model's own modules (``in_proj_weight``/``in_proj_bias``,
``out_proj``, ``ln_1``, ``ln_2``, ``mlp``, ``ls_1``, ``ls_2``), which are left untouched. Tokens are
sequence-first (L x B x D) inside the GEM blocks, as open_clip <= 2.23 (which GEM pins) runs them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def resample_abs_pos_embed(posemb: torch.Tensor, new_size: list[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """GEM's copy of timm's ``resample_abs_pos_embed`` (bicubic, antialias=True), square source.

    Args:
        posemb: 1 x (1 + N) x D.

    Returns:
        1 x (1 + h*w) x D.
    """
    new_ntok = new_size[0] * new_size[1]
    old = int(math.sqrt(posemb.shape[1] - num_prefix_tokens))
    if tuple(new_size) == (old, old):
        return posemb
    prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    posemb = posemb.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=tuple(new_size), mode="bicubic", antialias=True)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, new_ntok, -1)
    return torch.cat([prefix, posemb], dim=1)


def self_self_attention(
    attn_layer: nn.Module, x: torch.Tensor, ss_attn_iter: int = 1, ss_attn_temp: float | None = None
) -> list[torch.Tensor]:
    """``SelfSelfAttention.forward`` with the weights of ``attn_layer`` (an nn.MultiheadAttention).

    Args:
        x: L x B x D, ``ln_1`` of the block's (original path's) input.

    Returns:
        [GEM path output, original attention output], each L x B x D, after ``proj``.
    """
    num_heads = attn_layer.num_heads
    x = x.transpose(0, 1)
    B, N, C = x.shape
    scale = (C // num_heads) ** -0.5
    qkv = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias)
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    # original self-attention for the original path
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(B, N, C)
    x_ori = attn_layer.out_proj(x_ori)
    # GEM
    xs1, xs2, xs3 = v, k, q
    if ss_attn_temp is None:
        pre_norm = torch.norm(x, dim=-1).mean(dim=-1, keepdim=True).unsqueeze(1).unsqueeze(-1)
        inv_temp = pre_norm * scale
    else:
        inv_temp = ss_attn_temp
    for _ in range(ss_attn_iter):
        xs1, xs2, xs3 = F.normalize(xs1, dim=-1), F.normalize(xs2, dim=-1), F.normalize(xs3, dim=-1)
        attn1 = ((xs1 @ xs1.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
        attn2 = ((xs2 @ xs2.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
        attn3 = ((xs3 @ xs3.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
        xs1, xs2, xs3 = attn1 @ xs1, attn2 @ xs2, attn3 @ xs3
    # assignment to v
    xs1, xs2, xs3 = F.normalize(xs1, dim=-1), F.normalize(xs2, dim=-1), F.normalize(xs3, dim=-1)
    attn1 = ((xs1 @ xs1.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
    attn2 = ((xs2 @ xs2.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
    attn3 = ((xs3 @ xs3.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
    xs = (attn1 @ v + attn2 @ v + attn3 @ v) / 3
    x = xs.transpose(1, 2).reshape(B, N, C)
    x = attn_layer.out_proj(x)
    return [x.transpose(0, 1), x_ori.transpose(0, 1)]


def gem_residual_block(
    res_block: nn.Module, q_x: torch.Tensor | list[torch.Tensor], ss_attn_iter: int, ss_attn_temp: float | None,
    ignore_residual: bool = False,
) -> list[torch.Tensor]:
    """``GEMResidualBlock.forward`` around an open_clip ``ResidualAttentionBlock`` (L x B x D tokens)."""
    if isinstance(q_x, list):
        x_gem, q_x = q_x
    else:
        x_gem = q_x
    x_gem_res, x_ori_res = self_self_attention(res_block.attn, res_block.ln_1(q_x), ss_attn_iter, ss_attn_temp)
    x_gem_res, x_ori_res = res_block.ls_1(x_gem_res), res_block.ls_1(x_ori_res)
    # original
    x_ori = q_x + x_ori_res
    x_ori = x_ori + res_block.ls_2(res_block.mlp(res_block.ln_2(x_ori)))
    # GEM (ClearCLIP's copy: x_gem = x_gem_res when ignore_residual)
    x_gem = x_gem_res if ignore_residual else x_gem + x_gem_res
    return [x_gem, x_ori]


def modified_vit_forward(
    visual: nn.Module, x: torch.Tensor, depth: int = 7, ss_attn_iter: int = 1, ss_attn_temp: float | None = None,
    ignore_residual: bool = False,
) -> list[torch.Tensor]:
    """``modified_vit_forward`` of a ViT whose last ``depth - 1`` blocks ``apply_gem`` replaced.

    Args:
        x: B x 3 x H x W, CLIP-normalised.

    Returns:
        [x_gem, x]: B x (1 + h*w) x E each, after ``ln_post`` and ``proj``.
    """
    x = visual.conv1(x)
    grid_h, grid_w = x.shape[2:]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)  # _expand_token
    x = torch.cat([cls, x], dim=1)
    if x.shape[1] != visual.positional_embedding.shape[1]:  # (sic: compares tokens with the width)
        pos_emb = resample_abs_pos_embed(visual.positional_embedding.unsqueeze(0), [grid_h, grid_w])
    else:
        pos_emb = visual.positional_embedding
    x = x + pos_emb.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)

    blocks = visual.transformer.resblocks
    gem_blocks = {len(blocks) - i for i in range(1, depth)}  # apply_gem: resblocks[-i], i = 1 .. depth - 1
    batch_first = visual.transformer.batch_first  # open_clip >= 2.24 runs unchanged blocks on NLD
    x = x.permute(1, 0, 2)  # NLD -> LND
    for index, blk in enumerate(blocks):
        if index in gem_blocks:
            x = gem_residual_block(blk, x, ss_attn_iter, ss_attn_temp, ignore_residual)
        else:
            x = blk(x.permute(1, 0, 2)).permute(1, 0, 2) if batch_first else blk(x)
    x_gem, x = x
    x = x.permute(1, 0, 2)  # LND -> NLD
    x_gem = x_gem.permute(1, 0, 2)
    x = visual.ln_post(x)
    x_gem = visual.ln_post(x_gem)
    return [x_gem @ visual.proj, x @ visual.proj]


def forward_feature(
    clip_model: nn.Module, img: torch.Tensor, query_features: torch.Tensor, depth: int = 7, ss_attn_iter: int = 1,
    ss_attn_temp: float | None = None, ignore_residual: bool = False,
) -> torch.Tensor:
    """ClearCLIP's ``forward_feature`` with ``model_type='GEM'`` for one (padded) window.

    Args:
        img: 1 x 3 x H x W, CLIP-normalised.
        query_features: Q x E unit-norm text embeddings.

    Returns:
        1 x Q x H x W cosine logits, resized (bilinear) to the window.
    """
    visual = clip_model.visual
    patch = int(visual.conv1.kernel_size[0])
    image_features = modified_vit_forward(visual, img, depth, ss_attn_iter, ss_attn_temp, ignore_residual)[0][:, 1:, :]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = image_features @ query_features.T
    w, h = img[0].shape[-2] // patch, img[0].shape[-1] // patch
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], w, h)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")


def compute_padsize(height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
    left = right = top = bottom = 0
    if width % patch_size:
        lr = patch_size - width % patch_size
        left, right = lr // 2, lr - lr // 2
    if height % patch_size:
        tb = patch_size - height % patch_size
        top, bottom = tb // 2, tb - tb // 2
    return left, right, top, bottom


@torch.no_grad()
def forward_slide(
    clip_model: nn.Module, img: torch.Tensor, query_features: torch.Tensor, out_size: tuple[int, int], *,
    stride: int = 224, crop_size: int = 448, **gem_options,
) -> torch.Tensor:
    """ClearCLIP's ``forward_slide``: windows one at a time, padded to the patch size, averaged.

    Args:
        img: 1 x 3 x H x W, CLIP-normalised (after the protocol's resize).
        out_size: (H0, W0) the logits are resized to.

    Returns:
        1 x Q x H0 x W0 cosine logits.
    """
    patch = int(clip_model.visual.conv1.kernel_size[0])
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop_size + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop_size + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, query_features.shape[0], h_img, w_img))
    count_mat = img.new_zeros((1, 1, h_img, w_img))
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
            crop_seg_logit = forward_feature(clip_model, crop_img, query_features, **gem_options)
            if any(pad):
                left, top = pad[0], pad[2]
                crop_seg_logit = crop_seg_logit[:, :, top : top + height, left : left + width]
            preds += F.pad(crop_seg_logit, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    preds = preds / count_mat
    return F.interpolate(preds, size=tuple(out_size), mode="bilinear")
