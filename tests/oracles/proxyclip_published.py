"""A deliberately straightforward transcription of the PUBLISHED ProxyCLIP inference. Not for users.

This module exists for two reasons only:

(a) it is the test oracle that proves the fast path (:meth:`proxyclip.ProxyCLIP.predict_logits`,
    ``classify``, ``segment``) gives the published logits and labels;
(b) it is the "straightforward implementation" baseline of the benchmarks.

It is NOT part of the library's API: it is slow (one window at a time in a Python loop, an
L x L attention matrix repeated for every head), keeps the published code's NaN for rows whose
every entry is masked, and supports only what the oracle needs (CLIP ViTs, DINO VFMs, the
"clip" and "maskclip" baselines). Use :class:`proxyclip.ProxyCLIP` instead.

What is transcribed (github.com/mc-lan/ProxyCLIP, our own code written from reading it):
``proxyclip_segmentor.py`` ``forward_slide`` / ``forward_feature`` / ``postprocess_result`` /
``compute_padsize`` and the text-embedding loop of ``__init__``; ``open_clip/transformer.py``
``VisionTransformer.forward`` / ``interpolate_pos_encoding`` / ``custom_attn``; and DINO's own
``prepare_tokens`` / ``interpolate_pos_encoding`` / ``get_intermediate_layers`` (facebookresearch/
dino), which the published code calls through ``torch.hub``. The same computation runs here on
our already-built modules: an open_clip model and a timm DINO ViT (raw, or wrapped in
:class:`proxyclip.vfm.TimmViT`). Transformer blocks, layer norms and linear layers are the
modules' own; everything ProxyCLIP adds around them is written out here.

One deliberate departure: for NON-SQUARE (padded) windows the published code is wrong. It
unpacks ``B, nc, w, h = x.shape`` and builds CLIP's value grid as ``(h // p, w // p)``, i.e.
(columns, rows), and reshapes DINO's tokens to ``(H // p, H // p)`` (the height twice). Here
both grids are (rows, columns). For square windows (every window of the published evaluations,
whose resize brings the short side up to the window) this is the published computation exactly.
Positional embeddings are resized to (rows, columns) by the published code too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from proxyclip.model.vfm import TimmViT


def clip_patch_size(visual: nn.Module) -> int:
    return int(visual.conv1.kernel_size[0])


def clip_normalisation(visual: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(visual.preprocess_cfg["mean"]), tuple(visual.preprocess_cfg["std"])


def _published_pos_interpolation(patch_pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO's (and published ProxyCLIP's) positional-embedding resizing, by ``scale_factor``.

    Args:
        patch_pos: N x D embedding of a square grid (no class token).
        rows, cols: the new patch grid.

    Returns:
        rows*cols x D, row-major.
    """
    n = patch_pos.shape[0]
    side = int(math.sqrt(n))
    dim = patch_pos.shape[-1]
    r0, c0 = rows + 0.1, cols + 0.1  # "+ 0.1 to avoid floating point error" (DINO issue #8)
    square = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # 1 x D x side x side
    out = F.interpolate(square, scale_factor=(r0 / math.sqrt(n), c0 / math.sqrt(n)), mode="bicubic")
    assert int(r0) == out.shape[-2] and int(c0) == out.shape[-1]
    return out.permute(0, 2, 3, 1).reshape(-1, dim)  # rows*cols x D


def clip_positional_embedding(visual: nn.Module, rows: int, cols: int) -> torch.Tensor:
    """``VisionTransformer.interpolate_pos_encoding`` of the published open_clip fork.

    The published code resizes when the token count differs from the embedding's; here it
    resizes whenever the grid differs from the embedding's square grid, which is the same for
    every window our configurations produce (a non-square grid with the square's token count,
    e.g. 7 x 28 for ViT-B/16, needs windows larger than the protocol's).

    Returns:
        (1 + rows*cols) x D.
    """
    pos = visual.positional_embedding  # (1 + N) x D
    side = int(math.sqrt(pos.shape[0] - 1))
    if (rows, cols) == (side, side):
        return pos
    return torch.cat([pos[[0]], _published_pos_interpolation(pos[1:], rows, cols)], dim=0)


def _timm_dino(vfm: nn.Module) -> nn.Module:
    """The raw timm DINO ViT inside ``vfm``; refuses VFMs this oracle does not transcribe."""
    model = vfm
    if isinstance(vfm, TimmViT):
        if vfm.pos_recipe != "dino" or vfm.runs_at_window:
            raise ValueError("the reference transcribes DINO VFMs only (TimmViT with pos_recipe='dino')")
        model = vfm.model
    if getattr(model, "num_prefix_tokens", None) != 1 or getattr(model, "no_embed_class", True):
        raise ValueError("the reference transcribes DINO VFMs only: a timm ViT with one class token")
    return model


def dino_features(vfm: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """DINO's ``get_intermediate_layers(x)[0]`` reshaped as published ProxyCLIP uses it.

    Args:
        images: B x 3 x H x W, ImageNet-normalised.

    Returns:
        B x C x H/p x W/p final-layer patch tokens after the final norm (class token dropped).
    """
    m = _timm_dino(vfm)
    _, _, height, width = images.shape
    p = int(m.patch_embed.patch_size[0])
    rows, cols = height // p, width // p
    x = m.patch_embed.proj(images).flatten(2).transpose(1, 2)  # B x hw x C (DINO's PatchEmbed)
    x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # B x (1 + hw) x C
    pos = m.pos_embed[0]  # (1 + N) x C
    side = int(math.sqrt(pos.shape[0] - 1))
    if (rows, cols) != (side, side):  # DINO: "if npatch == N and w == h: return self.pos_embed"
        pos = torch.cat([pos[[0]], _published_pos_interpolation(pos[1:], rows, cols)], dim=0)
    x = m.pos_drop(x + pos)
    for blk in m.blocks:
        x = blk(x)
    feat = m.norm(x)  # B x (1 + hw) x C
    # Published: reshape(nb_im, I, J, -1) with I = J = H // p (wrong unless H == W); here (rows, cols).
    return feat[:, 1:, :].reshape(feat.shape[0], rows, cols, -1).permute(0, 3, 1, 2)  # B x C x rows x cols


def custom_attn(
    attn_layer: nn.Module, x: torch.Tensor, ex_feats: torch.Tensor, beta: float, gamma: float, token_size: tuple[int, int]
) -> torch.Tensor:
    """The published ``custom_attn``: proxy attention from VFM features, repeated per head.

    Args:
        attn_layer: the last CLIP block's ``nn.MultiheadAttention``.
        x: (1 + h*w) x B x D, ``ln_1`` of the last block's input (LND, class token first).
        ex_feats: B x C x H x W VFM features.
        token_size: CLIP's patch grid (h, w) as (rows, cols) -- the published code passes
            (cols, rows), which only matters for non-square windows.

    Returns:
        H*W x B x D: ``out_proj(Attn_p @ v)`` (no residual, no MLP).
    """
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    _, _, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)  # (1+hw) x B x D
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)  # B*nh x (1+hw) x hd

    _, _, height, width = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)  # B x C x HW
    similarity = torch.einsum("bcm,bcn->bmn", q_k, q_k)  # B x HW x HW
    similarity = (similarity - similarity.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")  # an all-masked row gives NaN, as published

    mask = similarity.to(x.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)  # B x nh x HW x HW
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])  # B*nh x HW x HW
    attn_weights = F.softmax(mask, dim=-1)

    v = v[:, 1:, :].reshape(bsz * num_heads, token_size[0], token_size[1], head_dim).permute(0, 3, 1, 2)  # B*nh x hd x h x w
    v = F.interpolate(v, size=(height, width), mode="bilinear", align_corners=False)  # B*nh x hd x H x W
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, height * width, head_dim)  # B*nh x HW x hd

    attn_output = torch.bmm(attn_weights, v)  # B*nh x HW x hd
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)  # HW x B x D
    return attn_layer.out_proj(attn_output)


def maskclip_attn(attn_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last block: each patch keeps its own value, ``out_proj(v)``; class token dropped.

    This is :func:`custom_attn` with the identity as attention (the baseline of Table 5).

    Args:
        x: (1 + h*w) x B x D, ``ln_1`` of the last block's input.

    Returns:
        h*w x B x D.
    """
    _, _, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)  # (1+hw) x B x D
    return attn_layer.out_proj(v[1:])


def encode_image(
    visual: nn.Module,
    x: torch.Tensor,
    ex_feats: torch.Tensor | None,
    method: str = "proxyclip",
    beta: float = 1.2,
    gamma: float = 3.0,
) -> torch.Tensor:
    """The published fork's ``VisionTransformer.forward``.

    Args:
        x: B x 3 x H x W, CLIP-normalised.
        ex_feats: B x C x H' x W' VFM features (method "proxyclip"), else None.

    Returns:
        B x L x E patch features (not normalised); L = H'*W' for proxyclip, else CLIP's h*w.
    """
    _, _, height, width = x.shape
    p = clip_patch_size(visual)
    token_size = (height // p, width // p)  # (rows, cols); published: (cols, rows)
    x = visual.conv1(x)  # B x D x h x w
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # B x hw x D
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    x = x + clip_positional_embedding(visual, *token_size).to(x.dtype)  # B x (1 + hw) x D
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)

    batch_first = visual.transformer.batch_first  # open_clip >= 2.24 runs blocks on NLD
    x = x.permute(1, 0, 2)  # NLD -> LND
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2) if batch_first else blk(x)
    blk = visual.transformer.resblocks[-1]
    if method == "proxyclip":
        x = custom_attn(blk.attn, blk.ln_1(x), ex_feats, beta, gamma, token_size)  # H'W' x B x D
    elif method == "maskclip":
        x = maskclip_attn(blk.attn, blk.ln_1(x))  # hw x B x D
    elif method == "clip":
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2) if batch_first else blk(x)
        x = x[1:]  # hw x B x D
    else:
        raise ValueError(f"unknown method {method!r}")
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x)
    return x @ visual.proj  # B x L x E


def forward_feature(
    clip_model: nn.Module,
    vfm: nn.Module | None,
    img: torch.Tensor,
    query_features: torch.Tensor,
    method: str = "proxyclip",
    beta: float = 1.2,
    gamma: float = 3.0,
) -> torch.Tensor:
    """The published ``forward_feature`` for one (padded) window.

    Args:
        img: 1 x 3 x H x W, CLIP-normalised, in the models' dtype.
        query_features: Q x E unit-norm text embeddings.

    Returns:
        1 x Q x H x W cosine logits, resized (bilinear) to the window.
    """
    visual = clip_model.visual
    p = clip_patch_size(visual)
    clip_token_size = img.shape[-2] // p, img.shape[-1] // p
    ex_feats = None
    if method == "proxyclip":
        clip_mean, clip_std = clip_normalisation(visual)
        vfm_mean, vfm_std = vfm.mean, vfm.std  # every VFM wrapper states them
        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=img.dtype, device=img.device).view(3, 1, 1)

        imgs_norm = []
        for i in range(len(img)):  # published: self.norm(self.unnorm(img[i]))
            pixels = img[i] * column(clip_std) + column(clip_mean)  # 3 x H x W in [0, 1]
            imgs_norm.append((pixels - column(vfm_mean)) / column(vfm_std))  # ImageNet-normalised
        ex_feats = dino_features(vfm, torch.stack(imgs_norm, dim=0))  # 1 x C x I x J
        grid = tuple(ex_feats.shape[-2:])
    else:
        grid = clip_token_size
    image_features = encode_image(visual, img, ex_feats, method, beta, gamma)  # 1 x IJ x E
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = image_features @ query_features.T  # 1 x IJ x Q
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], *grid)  # 1 x Q x I x J
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")


def compute_padsize(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to a multiple of ``multiple``."""
    left = right = top = bottom = 0
    if width % multiple:
        lr = multiple - width % multiple
        left, right = lr // 2, lr - lr // 2
    if height % multiple:
        tb = multiple - height % multiple
        top, bottom = tb // 2, tb - tb // 2
    return left, right, top, bottom


@torch.no_grad()
def forward_slide(
    clip_model: nn.Module,
    vfm: nn.Module | None,
    img: torch.Tensor,
    query_features: torch.Tensor,
    out_size: tuple[int, int],
    *,
    method: str = "proxyclip",
    beta: float = 1.2,
    gamma: float = 3.0,
    stride: int = 112,
    crop_size: int = 336,
    pad_multiple: int = 56,
) -> torch.Tensor:
    """The published ``forward_slide``: windows one at a time, summed with ``F.pad``, averaged.

    Args:
        img: 1 x 3 x H x W, CLIP-normalised (after the protocol's resize).
        query_features: Q x E unit-norm text embeddings, in the models' dtype.
        out_size: (H0, W0), the original image size the logits are resized to.

    Returns:
        1 x Q x H0 x W0 float32 cosine logits (not scaled).
    """
    dtype = clip_model.visual.proj.dtype
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop_size + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop_size + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, query_features.shape[0], h_img, w_img), dtype=torch.float32)
    count_mat = img.new_zeros((1, 1, h_img, w_img), dtype=torch.float32)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop_size, h_img), min(x1 + crop_size, w_img)
            y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            height, width = crop_img.shape[2:]
            pad = compute_padsize(height, width, pad_multiple)
            if any(pad):
                crop_img = F.pad(crop_img, pad)  # zero padding (in CLIP-normalised space)
            crop_seg_logit = forward_feature(
                clip_model, vfm, crop_img.to(dtype), query_features, method, beta, gamma
            )  # 1 x Q x h' x w'
            if any(pad):
                left, top = pad[0], pad[2]
                crop_seg_logit = crop_seg_logit[:, :, top : top + height, left : left + width]
            preds += F.pad(crop_seg_logit.float(), (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    preds = preds / count_mat
    return F.interpolate(preds, size=tuple(out_size), mode="bilinear")  # 1 x Q x H0 x W0


def postprocess_result(
    seg_logits: torch.Tensor, query_idx: Sequence[int], logit_scale: float = 40.0, prob_thd: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published ``postprocess_result`` for one image.

    Args:
        seg_logits: 1 x Q x H x W cosine logits.
        query_idx: the class index of every query (synonyms share one).

    Returns:
        labels (H x W int64) and class probabilities (C x H x W).
    """
    seg_logits = seg_logits[0] * logit_scale
    seg_logits = seg_logits.softmax(0)  # Q x H x W
    query_idx_t = torch.as_tensor(list(query_idx), dtype=torch.int64, device=seg_logits.device)
    num_cls, num_queries = int(query_idx_t.max()) + 1, len(query_idx_t)
    if num_cls != num_queries:
        seg_logits = seg_logits.unsqueeze(0)  # 1 x Q x H x W
        cls_index = F.one_hot(query_idx_t)  # Q x C
        cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)  # C x Q x 1 x 1
        seg_logits = (seg_logits * cls_index).max(1)[0]  # C x H x W
    seg_pred = seg_logits.argmax(0, keepdim=True)  # 1 x H x W
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0], seg_logits


@torch.no_grad()
def query_features(clip_model: nn.Module, tokenizer: object, queries: Sequence[str]) -> torch.Tensor:
    """The published text side: per query, 80 templates, normalise, mean, normalise.

    Returns:
        Q x E unit-norm embeddings in the model's dtype.
    """
    device = clip_model.visual.proj.device
    features = []
    for qw in queries:
        query = tokenizer([temp(qw) for temp in open_clip.OPENAI_IMAGENET_TEMPLATES]).to(device)  # 80 x 77
        feature = clip_model.encode_text(query)  # 80 x E
        feature = feature / feature.norm(dim=-1, keepdim=True)
        feature = feature.mean(dim=0)
        feature = feature / feature.norm()
        features.append(feature.unsqueeze(0))
    return torch.cat(features, dim=0)  # Q x E


def query_index(names: Sequence[Sequence[str]]) -> list[int]:
    """The class index of every query name, as the published ``get_cls_idx`` builds it.

    Args:
        names: for each class, its names (synonyms), e.g. ``ClassList.names``.
    """
    return [idx for idx, synonyms in enumerate(names) for _ in synonyms]


def predict_logits(model: nn.Module, image: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """:func:`forward_slide` with a :class:`proxyclip.ProxyCLIP`'s modules and configuration.

    Args:
        image: 3 x H x W CLIP-normalised (e.g. ``model.preprocess(pixels)``).
        text: Q x E unit-norm text embeddings.

    Returns:
        Q x H0 x W0 float32 cosine logits, comparable with ``model.predict_logits(image, text, out_size)``.
    """
    cfg = model.config
    if cfg.method == "proxyclip" and cfg.options.attention != "proxy":
        raise ValueError(f"the reference transcribes the published proxy attention only, not {cfg.options.attention!r}")
    return forward_slide(
        model.clip_model, model.vfm, image[None].to(model.device), text.to(model.dtype), out_size,
        method=cfg.method, beta=getattr(cfg.options, "beta", 1.2), gamma=getattr(cfg.options, "gamma", 3.0), stride=cfg.stride, crop_size=cfg.window,
        pad_multiple=cfg.pad_multiple,
    )[0]


def segment(model: nn.Module, pixels: np.ndarray, names: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The published pipeline after the resize, for a :class:`proxyclip.ProxyCLIP`'s modules.

    Text embeddings come from :func:`query_features`; the resized, CLIP-normalised image from
    ``model.preprocess`` (the resize is the data pipeline's, not the segmentor's).

    Args:
        pixels: H x W x 3 uint8 RGB.
        names: for each class, its query names.

    Returns:
        labels (H x W int64) and class probabilities (C x H x W float32), comparable with
        ``model.segment(pixels, names)``.
    """
    text = query_features(model.clip_model, model.tokenizer, [q for synonyms in names for q in synonyms])
    logits = predict_logits(model, model.preprocess(pixels), text, tuple(pixels.shape[:2]))  # Q x H x W
    cfg = model.config
    return postprocess_result(logits[None], query_index(names), cfg.logit_scale, cfg.bg_threshold)
