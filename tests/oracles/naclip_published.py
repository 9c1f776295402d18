"""A deliberately straightforward transcription of the PUBLISHED NACLIP inference. Not for users.

The test oracle of ``proxyclip.model.methods.naclip`` and the "published code" baseline of
``benchmarks/bench_methods.py``: one window at a time, attention matrices per head with ``bmm``,
the Gaussian neighbourhood built by the published convolution of one-hot maps.

What is transcribed (github.com/sinahmr/NACLIP, our own code written from reading it):
``clip/model.py`` ``VisionTransformer.forward(return_all=True)`` with ``arch`` in {reduced,
vanilla}, ``interpolate_pos_encoding``, ``gaussian_window``, ``get_attention_addition`` and
``custom_attn`` (attention strategies naclip, nonly, kk, csa, vanilla); ``naclip.py``
``forward_feature``, ``forward_slide``, ``predict`` (``slide_crop=0``: the whole image at once;
the logits resized to the original size, then PAMR) and ``postprocess_result``. It runs on an open_clip
model's modules (the published code loads OpenAI's CLIP with its own copy of the architecture).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import pamr_published
from .sclip_published import embed, run_block


def gaussian_window(dim1: int, dim2: int, std: float = 1.0) -> torch.Tensor:
    """The published ``gaussian_window``: dim1 x dim2, ``exp(-|offset|^2 / (2 std^2))`` about the centre."""
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (dim1, dim2):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start=start * constant, end=(start + (dim - 1)) * constant, steps=dim,
                                 dtype=torch.float))
    dist_square_to_mu = (torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0)
    return torch.exp(-dist_square_to_mu)


def get_attention_addition(dim1: int, dim2: int, window: torch.Tensor, adjust_for_cls: bool = True) -> torch.Tensor:
    """The published ``get_attention_addition``: (1 + dim1*dim2) x (1 + dim1*dim2), the window centred on
    each patch by a 'same' convolution of its one-hot map; zero row and column for the class token."""
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()  # m[ijkl] = 1 iff (i, j) == (k, l)
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding="same").squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    if adjust_for_cls:
        v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
        out = torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])
    return out


# the published model caches the neighbourhood per patch grid (``self.addition_cache[n_patches]``)
ADDITION_CACHE: dict[tuple, torch.Tensor] = {}


def custom_attn(attn_layer: nn.Module, x: torch.Tensor, n_patches: tuple[int, int], attn_strategy: str = "naclip",
                gaussian_std: float = 5.0) -> torch.Tensor:
    """The published ``custom_attn``: L x B x D (``ln_1`` of the block's input) -> L x B x D."""
    num_heads = attn_layer.num_heads
    num_tokens, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim**-0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)  # B*nh x L x hd
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if attn_strategy in ("naclip", "nonly"):
        addition = ADDITION_CACHE.get((n_patches, gaussian_std, x.dtype, x.device))  # published: self.addition_cache
        if addition is None:
            window_size = [side * 2 - 1 for side in n_patches]
            window = gaussian_window(*window_size, std=gaussian_std)
            addition = get_attention_addition(*n_patches, window).unsqueeze(0).to(x.dtype).to(x.device)
            ADDITION_CACHE[(n_patches, gaussian_std, x.dtype, x.device)] = addition
        if attn_strategy == "naclip":
            attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
            omega = addition
        else:
            attn_weights = torch.zeros((num_heads, num_tokens, num_tokens)).to(x.dtype).to(x.device)
            omega = addition * (scale * torch.einsum("hop,hPO->hpP", q.norm(dim=2).unsqueeze(1),
                                                     k.norm(dim=2).unsqueeze(2)).mean().item())
        attn_weights += omega
        attn_weights = F.softmax(attn_weights, dim=-1)
    elif attn_strategy == "csa":
        q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
    elif attn_strategy == "vanilla":
        attn_weights = F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
    elif attn_strategy == "kk":
        attn_weights = F.softmax(torch.bmm(k * scale, k.transpose(1, 2)), dim=-1)
    else:
        raise ValueError(f"unknown attn_strategy {attn_strategy!r}")
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def encode_image(visual: nn.Module, x: torch.Tensor, arch: str = "reduced", attn_strategy: str = "naclip",
                 gaussian_std: float = 5.0) -> torch.Tensor:
    """``VisionTransformer.forward(x, return_all=True)`` after ``set_params(arch, attn_strategy,
    gaussian_std)``: B x (1 + hw) x E."""
    patch = int(visual.conv1.kernel_size[0])
    n_patches = (x.shape[2] // patch, x.shape[3] // patch)
    x = embed(visual, x)  # the same prelude as SCLIP's (both are OpenAI's CLIP with DINO's interpolation)
    for blk in visual.transformer.resblocks[:-1]:
        x = run_block(visual, blk, x)
    blk = visual.transformer.resblocks[-1]
    if arch == "vanilla":
        x = x + custom_attn(blk.attn, blk.ln_1(x), n_patches, attn_strategy, gaussian_std)
        x = x + blk.mlp(blk.ln_2(x))
    elif arch == "reduced":
        x = custom_attn(blk.attn, blk.ln_1(x), n_patches, attn_strategy, gaussian_std)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    x = x.permute(1, 0, 2)  # LND -> NLD
    return visual.ln_post(x) @ visual.proj


def forward_feature(clip_model: nn.Module, img: torch.Tensor, query_features: torch.Tensor,
                    gaussian_std: float = 5.0) -> torch.Tensor:
    """The published ``forward_feature``: 1 x 3 x H x W -> 1 x Q x H x W cosine logits."""
    image_features = encode_image(clip_model.visual, img, gaussian_std=gaussian_std)
    image_features = image_features[:, 1:]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = image_features @ query_features.T
    patch = int(clip_model.visual.conv1.kernel_size[0])
    w, h = img[0].shape[-2] // patch, img[0].shape[-1] // patch
    out_dim = logits.shape[-1]
    logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)


def forward_slide(clip_model: nn.Module, img: torch.Tensor, query_features: torch.Tensor, stride: int = 112,
                  crop_size: int = 224, gaussian_std: float = 5.0) -> torch.Tensor:
    """The published ``forward_slide``: windows one at a time, no padding, averaged (not resized)."""
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
            crop_seg_logit = forward_feature(clip_model, img[:, :, y1:y2, x1:x2], query_features, gaussian_std)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


@torch.no_grad()
def predict(clip_model: nn.Module, inputs: torch.Tensor, query_features: torch.Tensor, out_size: tuple[int, int],
            slide_stride: int = 112, slide_crop: int = 224, gaussian_std: float = 5.0, pamr_steps: int = 10,
            pamr_stride: Sequence[int] = (8, 16)) -> torch.Tensor:
    """The published ``predict`` up to ``postprocess_result``: 1 x 3 x H x W (resized, CLIP-normalised)
    -> 1 x Q x H0 x W0 cosine logits at the original size, PAMR-refined if ``pamr_steps``."""
    if slide_crop > 0:
        seg_logits = forward_slide(clip_model, inputs, query_features, slide_stride, slide_crop, gaussian_std)
    else:
        seg_logits = forward_feature(clip_model, inputs, query_features, gaussian_std)
    seg_logits = F.interpolate(seg_logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    if pamr_steps > 0:
        img = F.interpolate(inputs, size=tuple(out_size), mode="bilinear", align_corners=False)
        seg_logits = pamr_published.pamr(img, seg_logits.to(img.dtype), pamr_steps, pamr_stride)
    return seg_logits


def postprocess_result(seg_logits: torch.Tensor, query_idx: Sequence[int], logit_scale: float = 40.0,
                       prob_thd: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The published ``postprocess_result`` for one image: labels (H x W) and probabilities (C x H x W;
    NACLIP renormalises them to sum to one after the threshold, which changes no label)."""
    seg_probs = torch.softmax(seg_logits[0] * logit_scale, dim=0)
    query_idx_t = torch.as_tensor(list(query_idx), dtype=torch.int64)
    num_cls, num_queries = int(query_idx_t.max()) + 1, len(query_idx_t)
    if num_cls != num_queries:
        seg_probs = seg_probs.unsqueeze(0)
        cls_index = F.one_hot(query_idx_t).T.view(num_cls, num_queries, 1, 1)
        seg_probs = (seg_probs * cls_index).max(1)[0]
    seg_pred = seg_probs.argmax(0, keepdim=True)
    seg_pred[seg_probs.max(0, keepdim=True)[0] < prob_thd] = 0
    seg_probs /= seg_probs.sum(0, keepdim=True)
    return seg_pred[0], seg_probs


def predict_logits(model: nn.Module, image: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """:func:`predict` with a :class:`proxyclip.ProxyCLIP`'s modules and configuration: a window at
    least as large as the image is the published ``slide_crop=0``; PAMR (10 iterations, dilations
    (8, 16)) when ``config.refine == "pamr"``.

    Returns:
        Q x H0 x W0, comparable with ``model.predict_logits(image, text, out_size)``.
    """
    cfg = model.config
    assert cfg.method == "naclip" and cfg.pad_multiple == 1, "the published NACLIP does not pad windows"
    whole = cfg.window >= max(image.shape[-2:])
    return predict(model.clip_model, image[None].to(model.device, model.dtype), text.to(model.dtype), out_size,
                   slide_stride=cfg.stride, slide_crop=0 if whole else cfg.window,
                   gaussian_std=cfg.options.gaussian_std, pamr_steps=10 if cfg.refine == "pamr" else 0)[0]
