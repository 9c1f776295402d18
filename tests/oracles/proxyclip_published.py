"""A deliberately straightforward transcription of the PUBLISHED ProxyCLIP inference. Not for users.

This module exists for two reasons only:

(a) it is the test oracle that proves the fast path (:meth:`proxyclip.ProxyCLIP.segment`,
    ``predict_logits``, ``classify``) gives the published probabilities and labels;
(b) it is the "straightforward implementation" baseline of the benchmarks.

It shares nothing with the code under test that the published code does not share: the models'
weights, open_clip's CLIP modules (the published code runs a vendored open_clip) and the settings
(window, stride, beta, gamma, ...). Its constants, its resize (OpenCV, with mmcv's size rule), its
normalisation, its windows and every VFM's forward pass are its own: the VFMs run from their
ORIGINAL checkpoints' state dicts (DINO's, DINOv2's, SAM's and MAE's own keys) through functional
transcriptions of the original forward passes, not through timm. It is slow (one window at a
time, an L x L attention repeated for every head) and keeps the published code's NaN for rows
whose every entry is masked.

What is transcribed (github.com/mc-lan/ProxyCLIP, our own code written from reading it):
``configs/cfg_*.py`` (``Resize(scale=(2048, S), keep_ratio=True)``: mmcv's ``rescale_size`` and
``imresize`` with cv2 INTER_LINEAR), ``SegDataPreProcessor(mean, std, bgr_to_rgb=True)``,
``proxyclip_segmentor.py`` ``forward_slide`` / ``forward_feature`` (``self.norm(self.unnorm(img))``
and the four VFM branches) / ``postprocess_result`` / ``compute_padsize`` and the text-embedding
loop of ``__init__``; ``open_clip/transformer.py`` ``VisionTransformer.forward`` /
``interpolate_pos_encoding`` / ``custom_attn``; DINO's ``prepare_tokens`` /
``interpolate_pos_encoding`` / ``get_intermediate_layers`` (facebookresearch/dino); DINOv2's
``prepare_tokens_with_masks`` / ``interpolate_pos_encoding`` / ``get_intermediate_layers(reshape=True)``
(facebookresearch/dinov2, the ``*_reg`` hub models: antialiased bicubic, offset 0); segment-anything's
``ImageEncoderViT`` / ``Block`` / ``Attention`` / ``window_partition`` / ``get_rel_pos`` /
``add_decomposed_rel_pos`` / ``LayerNorm2d`` (``build_sam_vit_b``: LayerNorm eps 1e-6, window 14,
global blocks 2, 5, 8, 11); MAE's ``models_vit.VisionTransformer.forward_features`` (global_pool
False) built at ``img_size=slide_crop`` with ``interpolate_pos_embed`` applied at load.

One deliberate departure: for NON-SQUARE (padded) windows the published code is wrong. It
unpacks ``B, nc, w, h = x.shape`` and builds CLIP's value grid as ``(h // p, w // p)``, i.e.
(columns, rows), and reshapes DINO's tokens to ``(H // p, H // p)`` (the height twice). Here
both grids are (rows, columns). For square windows (every window of the published evaluations,
whose resize brings the short side up to the window) this is the published computation exactly.
Positional embeddings are resized to (rows, columns) by the published code too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

# The published constants (proxyclip_segmentor.py), written out here on purpose.
DATA_MEAN = [122.771, 116.746, 104.094]  # SegDataPreProcessor, 0-255 RGB
DATA_STD = [68.501, 66.632, 70.323]
UNNORM_MEAN = [0.48145466, 0.4578275, 0.40821073]  # UnNormalize: CLIP's 0-1 constants
UNNORM_STD = [0.26862954, 0.26130258, 0.27577711]
NORM_MEAN = [0.485, 0.456, 0.406]  # transforms.Normalize: ImageNet's, for every VFM
NORM_STD = [0.229, 0.224, 0.225]


# ---- the data pipeline: LoadImageFromFile (BGR), Resize(keep_ratio=True), SegDataPreProcessor ----

def mmcv_rescale(img: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
    """``mmcv.imrescale(img, scale, interpolation='bilinear', backend='cv2')``.

    Args:
        img: H x W x 3 uint8 (BGR as mmcv loads it; resizing is per channel).
        scale: the config's ``scale``, e.g. (2048, 336).

    Returns:
        h x w x 3 uint8.
    """
    h, w = img.shape[:2]
    max_long_edge, max_short_edge = max(scale), min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    new_size = int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)  # (w, h)
    return cv2.resize(img, new_size, interpolation=cv2.INTER_LINEAR)


def data_preprocessor(img_bgr: np.ndarray) -> torch.Tensor:
    """``SegDataPreProcessor(mean=DATA_MEAN, std=DATA_STD, bgr_to_rgb=True)`` for one image.

    Args:
        img_bgr: H x W x 3 uint8 BGR.

    Returns:
        1 x 3 x H x W float32, RGB, normalised.
    """
    x = torch.from_numpy(np.ascontiguousarray(img_bgr.transpose(2, 0, 1)))  # 3 x H x W (PackSegInputs)
    x = x[[2, 1, 0], ...].float()  # bgr_to_rgb, then float
    mean = torch.tensor(DATA_MEAN).view(-1, 1, 1)
    std = torch.tensor(DATA_STD).view(-1, 1, 1)
    return ((x - mean) / std)[None]


def unnorm_norm(img: torch.Tensor) -> torch.Tensor:
    """``self.norm(self.unnorm(img))`` for one 3 x H x W CLIP-normalised image (as published, in place
    on a clone: ``t.mul_(s).add_(m)`` per channel, then ``Normalize``'s ``sub_(mean).div_(std)``)."""
    image2 = torch.clone(img)
    for t, m, s in zip(image2, UNNORM_MEAN, UNNORM_STD):
        t.mul_(s).add_(m)
    mean = torch.as_tensor(NORM_MEAN, dtype=image2.dtype, device=image2.device).view(-1, 1, 1)
    std = torch.as_tensor(NORM_STD, dtype=image2.dtype, device=image2.device).view(-1, 1, 1)
    return image2.sub_(mean).div_(std)


# ---- positional embeddings ---------------------------------------------------------------

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


def _clip_patch(visual: nn.Module) -> int:
    return int(visual.conv1.kernel_size[0])


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


# ---- the VFMs, from their original checkpoints ----------------------------------------------

@dataclass
class PublishedVFM:
    """A VFM as the published code holds it: its kind and its ORIGINAL checkpoint's tensors.

    kind: "dino" (facebookresearch/dino keys), "dinov2" (facebookresearch/dinov2, with registers),
    "sam" (segment-anything's ``image_encoder.*`` keys; other keys ignored) or "mae" (MAE's encoder
    keys; decoder keys ignored, as ``load_state_dict(strict=False)`` does).
    """

    kind: str
    state: Mapping[str, torch.Tensor]
    num_heads: int


def published_vfm(vfm: object) -> PublishedVFM:
    """A :class:`PublishedVFM` as it is, or a DINO given as a timm ViT (raw or wrapped in a ``.model``):
    timm's DINO keys are DINO's own, so its state dict is the original checkpoint."""
    if isinstance(vfm, PublishedVFM):
        return vfm
    model = getattr(vfm, "model", vfm)
    if getattr(vfm, "runs_at_window", False) or getattr(vfm, "pos_recipe", "dino") != "dino":
        raise ValueError("give VFMs other than DINO as PublishedVFM(kind, original state dict, heads)")
    if getattr(model, "num_prefix_tokens", None) != 1 or getattr(model, "no_embed_class", True):
        raise ValueError("the oracle reads a DINO from a timm ViT with one class token only; else use PublishedVFM")
    return PublishedVFM("dino", model.state_dict(), model.blocks[0].attn.num_heads)


def _linear(x: torch.Tensor, state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    return F.linear(x, state[key + ".weight"], state.get(key + ".bias"))


def _layer_norm(x: torch.Tensor, state: Mapping[str, torch.Tensor], key: str, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[key + ".weight"], state[key + ".bias"], eps)


def _vit_block(x: torch.Tensor, state: Mapping[str, torch.Tensor], prefix: str, num_heads: int,
               scale_first: bool, layer_scale: bool) -> torch.Tensor:
    """One pre-norm ViT block (DINO's, DINOv2's, timm's of MAE's time): LayerNorm eps 1e-6, exact GELU.

    Args:
        x: B x N x C tokens.
        scale_first: DINOv2 scales q before ``q @ k^T``; DINO and MAE scale after.
        layer_scale: DINOv2's ``ls1.gamma`` / ``ls2.gamma``.
    """
    b, n, c = x.shape
    h = _layer_norm(x, state, prefix + "norm1")
    qkv = _linear(h, state, prefix + "attn.qkv").reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # B x nh x N x hd each
    scale = (c // num_heads) ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1) if scale_first else (q @ k.transpose(-2, -1)) * scale  # B x nh x N x N
    h = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)  # B x N x C
    h = _linear(h, state, prefix + "attn.proj")
    x = x + (h * state[prefix + "ls1.gamma"] if layer_scale else h)
    h = _linear(F.gelu(_linear(_layer_norm(x, state, prefix + "norm2"), state, prefix + "mlp.fc1")), state,
                prefix + "mlp.fc2")
    return x + (h * state[prefix + "ls2.gamma"] if layer_scale else h)


def _depth(state: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    return 1 + max(int(k[len(prefix):].split(".")[1]) for k in state if k.startswith(prefix + "blocks."))


def _patch_tokens(images: torch.Tensor, state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """A ViT's PatchEmbed: B x 3 x H x W -> B x hw x C."""
    x = F.conv2d(images, state[key + ".weight"], state[key + ".bias"], stride=state[key + ".weight"].shape[-1])
    return x.flatten(2).transpose(1, 2)


def dino_features(vfm: PublishedVFM, images: torch.Tensor) -> torch.Tensor:
    """DINO's ``get_intermediate_layers(x)[0]`` reshaped as published ProxyCLIP uses it.

    Args:
        images: B x 3 x H x W, ImageNet-normalised.

    Returns:
        B x C x H/p x W/p final-layer patch tokens after the final norm (class token dropped).
    """
    sd = vfm.state
    p = sd["patch_embed.proj.weight"].shape[-1]
    _, _, height, width = images.shape
    rows, cols = height // p, width // p
    x = _patch_tokens(images, sd, "patch_embed.proj")  # B x hw x C
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)  # B x (1 + hw) x C
    pos = sd["pos_embed"][0]  # (1 + N) x C
    side = int(math.sqrt(pos.shape[0] - 1))
    if (rows, cols) != (side, side):  # DINO: "if npatch == N and w == h: return self.pos_embed"
        pos = torch.cat([pos[[0]], _published_pos_interpolation(pos[1:], rows, cols)], dim=0)
    x = x + pos
    for i in range(_depth(sd)):
        x = _vit_block(x, sd, f"blocks.{i}.", vfm.num_heads, scale_first=False, layer_scale=False)
    feat = _layer_norm(x, sd, "norm")  # B x (1 + hw) x C
    # Published: reshape(nb_im, I, J, -1) with I = J = H // p (wrong unless H == W); here (rows, cols).
    return feat[:, 1:, :].reshape(feat.shape[0], rows, cols, -1).permute(0, 3, 1, 2)  # B x C x rows x cols


def dinov2_features(vfm: PublishedVFM, images: torch.Tensor) -> torch.Tensor:
    """DINOv2's ``get_intermediate_layers(x, reshape=True)[0]`` (registers; antialiased bicubic
    positional embeddings to the exact grid, ``interpolate_offset=0``, as the ``*_reg`` hub models).

    Returns:
        B x C x H/p x W/p.
    """
    sd = vfm.state
    p = sd["patch_embed.proj.weight"].shape[-1]
    _, _, w, h = images.shape  # DINOv2's names: w is the height here, and it stays consistent
    x = _patch_tokens(images, sd, "patch_embed.proj")  # B x hw x C
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)  # B x (1 + hw) x C
    pos = sd["pos_embed"]  # 1 x (1 + N) x C
    n = pos.shape[1] - 1
    if not (x.shape[1] - 1 == n and w == h):
        m = int(math.sqrt(n))
        patch_pos = F.interpolate(pos.float()[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), size=(w // p, h // p),
                                  mode="bicubic", antialias=True)  # 1 x C x w0 x h0
        pos = torch.cat([pos.float()[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    x = x + pos.to(x.dtype)
    registers = sd["register_tokens"]  # 1 x R x C
    x = torch.cat([x[:, :1], registers.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)  # B x (1 + R + hw) x C
    for i in range(_depth(sd)):
        x = _vit_block(x, sd, f"blocks.{i}.", vfm.num_heads, scale_first=True, layer_scale=True)
    out = _layer_norm(x, sd, "norm")[:, 1 + registers.shape[1]:]  # B x hw x C
    return out.reshape(x.shape[0], w // p, h // p, -1).permute(0, 3, 1, 2)  # B x C x rows x cols


def mae_features(vfm: PublishedVFM, images: torch.Tensor, slide_crop: int) -> torch.Tensor:
    """MAE as published: ``models_vit.vit_base_patch16(img_size=slide_crop, global_pool=False)`` with
    ``interpolate_pos_embed`` (bicubic to the exact grid, no antialiasing) applied when loading;
    the window resized to slide_crop x slide_crop; ``forward_features``: ``norm(x[:, 1:])``.

    Returns:
        B x C x I x I, I = slide_crop // p.
    """
    sd = vfm.state
    p = sd["patch_embed.proj.weight"].shape[-1]
    images = F.interpolate(images, size=(slide_crop, slide_crop), mode="bilinear", align_corners=False)
    pos = sd["pos_embed"]  # 1 x (1 + N) x C, interpolate_pos_embed at load:
    orig, new = int((pos.shape[-2] - 1) ** 0.5), slide_crop // p
    if orig != new:
        tokens = pos[:, 1:].reshape(-1, orig, orig, pos.shape[-1]).permute(0, 3, 1, 2)
        tokens = F.interpolate(tokens, size=(new, new), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    x = _patch_tokens(images, sd, "patch_embed.proj")  # B x II x C
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + pos
    for i in range(_depth(sd)):
        x = _vit_block(x, sd, f"blocks.{i}.", vfm.num_heads, scale_first=False, layer_scale=False)
    out = _layer_norm(x[:, 1:], sd, "norm")  # B x II x C
    return out.reshape(out.shape[0], new, new, -1).permute(0, 3, 1, 2)  # rearrange 'b (h w) c -> b c h w'


def _sam_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment-anything ``get_rel_pos``."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist,
                                mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def _sam_attention(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str, num_heads: int) -> torch.Tensor:
    """segment-anything ``Attention.forward`` with decomposed relative positions. x: B x H x W x C."""
    b, h, w, _ = x.shape
    qkv = _linear(x, sd, prefix + "qkv").reshape(b, h * w, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * num_heads, h * w, -1).unbind(0)  # B*nh x HW x hd each
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # B*nh x HW x HW
    rh = _sam_rel_pos(h, h, sd[prefix + "rel_pos_h"])  # H x H x hd
    rw = _sam_rel_pos(w, w, sd[prefix + "rel_pos_w"])  # W x W x hd
    r_q = q.reshape(q.shape[0], h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    attn = (attn.view(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(-1, h * w, h * w)
    attn = attn.softmax(dim=-1)
    x = (attn @ v).view(b, num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return _linear(x, sd, prefix + "proj")


def _sam_block(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str, num_heads: int,
               window_size: int) -> torch.Tensor:
    """segment-anything ``Block.forward`` (window partition with padding, unpartition). x: B x H x W x C."""
    shortcut = x
    x = _layer_norm(x, sd, prefix + "norm1")
    if window_size > 0:
        b, h, w, c = x.shape
        pad_h, pad_w = (window_size - h % window_size) % window_size, (window_size - w % window_size) % window_size
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
        x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)
    x = _sam_attention(x, sd, prefix + "attn.", num_heads)
    if window_size > 0:
        x = x.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
        x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)[:, :h, :w, :].contiguous()
    x = shortcut + x
    return x + _linear(F.gelu(_linear(_layer_norm(x, sd, prefix + "norm2"), sd, prefix + "mlp.lin1")), sd,
                       prefix + "mlp.lin2")


def _sam_layer_norm_2d(x: torch.Tensor, sd: Mapping[str, torch.Tensor], key: str, eps: float = 1e-6) -> torch.Tensor:
    """segment-anything ``LayerNorm2d``. x: B x C x H x W."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return sd[key + ".weight"][:, None, None] * x + sd[key + ".bias"][:, None, None]


def sam_features(vfm: PublishedVFM, images: torch.Tensor) -> torch.Tensor:
    """``self.vfm.image_encoder(F.interpolate(imgs_norm, size=(1024, 1024), mode='bilinear'))``
    (1024: SAM's image size; the positional embedding's grid x the patch size for other sizes).

    Window blocks are told from global ones by their relative-position tables (2 * window - 1 rows).

    Returns:
        B x 256 x 64 x 64.
    """
    sd = {k[len("image_encoder."):]: v for k, v in vfm.state.items() if k.startswith("image_encoder.")}
    p = sd["patch_embed.proj.weight"].shape[-1]
    grid = sd["pos_embed"].shape[1]
    size = grid * p
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).permute(0, 2, 3, 1)
    x = x + sd["pos_embed"]  # B x 64 x 64 x C
    for i in range(_depth(sd)):
        window = (sd[f"blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2
        x = _sam_block(x, sd, f"blocks.{i}.", vfm.num_heads, 0 if window == grid else window)
    x = F.conv2d(x.permute(0, 3, 1, 2), sd["neck.0.weight"])
    x = _sam_layer_norm_2d(x, sd, "neck.1")
    x = F.conv2d(x, sd["neck.2.weight"], padding=1)
    return _sam_layer_norm_2d(x, sd, "neck.3")  # B x 256 x 64 x 64


def vfm_features(vfm: PublishedVFM, imgs_norm: torch.Tensor, slide_crop: int) -> torch.Tensor:
    """The four VFM branches of the published ``forward_feature``: B x C x I x J features."""
    if vfm.kind == "dino":
        return dino_features(vfm, imgs_norm)
    if vfm.kind == "dinov2":
        return dinov2_features(vfm, imgs_norm)
    if vfm.kind == "sam":
        return sam_features(vfm, imgs_norm)
    if vfm.kind == "mae":
        return mae_features(vfm, imgs_norm, slide_crop)
    raise ValueError(f"unknown VFM kind {vfm.kind!r}; use dino, dinov2, sam or mae")


# ---- CLIP's last block with the proxy attention ---------------------------------------------

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
    p = _clip_patch(visual)
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
    vfm: PublishedVFM | nn.Module | None,
    img: torch.Tensor,
    query_features: torch.Tensor,
    method: str = "proxyclip",
    beta: float = 1.2,
    gamma: float = 3.0,
    slide_crop: int = 336,
) -> torch.Tensor:
    """The published ``forward_feature`` for one (padded) window.

    Args:
        vfm: a :class:`PublishedVFM` (or a timm DINO, see :func:`published_vfm`); None for the baselines.
        img: 1 x 3 x H x W, CLIP-normalised, in the models' dtype.
        query_features: Q x E unit-norm text embeddings.
        slide_crop: the window size (MAE's input size).

    Returns:
        1 x Q x H x W cosine logits, resized (bilinear) to the window.
    """
    visual = clip_model.visual
    p = _clip_patch(visual)
    clip_token_size = img.shape[-2] // p, img.shape[-1] // p
    ex_feats = None
    if method == "proxyclip":
        imgs_norm = torch.stack([unnorm_norm(img[i]) for i in range(len(img))], dim=0)  # 1 x 3 x H x W
        ex_feats = vfm_features(published_vfm(vfm), imgs_norm, slide_crop)  # 1 x C x I x J
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
    vfm: PublishedVFM | nn.Module | None,
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
                clip_model, vfm, crop_img.to(dtype), query_features, method, beta, gamma, crop_size
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


def predict_logits(model: nn.Module, image: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int],
                   vfm: PublishedVFM | None = None) -> torch.Tensor:
    """:func:`forward_slide` with a :class:`proxyclip.ProxyCLIP`'s CLIP and settings.

    Args:
        image: 3 x H x W CLIP-normalised.
        text: Q x E unit-norm text embeddings.
        vfm: the VFM from its original checkpoint; None: the model's VFM, which must be a DINO.

    Returns:
        Q x H0 x W0 float32 cosine logits, comparable with ``model.predict_logits(image, text, out_size)``.
    """
    cfg = model.config
    options = getattr(cfg, "options", cfg)  # a ProxyCLIPConfig's method options, or a plain namespace of settings
    if cfg.method == "proxyclip" and getattr(options, "attention", "proxy") != "proxy":
        raise ValueError(f"the reference transcribes the published proxy attention only, not {options.attention!r}")
    if vfm is None and cfg.method == "proxyclip":
        vfm = published_vfm(model.vfm)
    device = model.clip_model.visual.proj.device
    return forward_slide(
        model.clip_model, vfm, image[None].to(device), text.to(model.clip_model.visual.proj.dtype), out_size,
        method=cfg.method, beta=getattr(options, "beta", 1.2), gamma=getattr(options, "gamma", 3.0),
        stride=cfg.stride, crop_size=cfg.window,
        pad_multiple=cfg.pad_multiple,
    )[0]


def published_input(pixels: np.ndarray, short_side: int, long_side: int = 2048) -> torch.Tensor:
    """The published data pipeline from H x W x 3 uint8 RGB pixels: BGR (as mmcv loads them),
    ``Resize(scale=(long_side, short_side), keep_ratio=True)``, ``SegDataPreProcessor``.

    Returns:
        3 x h x w float32, CLIP-normalised with the published constants.
    """
    bgr = np.ascontiguousarray(pixels[..., ::-1])  # H x W x 3 BGR
    return data_preprocessor(mmcv_rescale(bgr, (long_side, short_side)))[0]


def segment(model: nn.Module, pixels: np.ndarray, names: Sequence[Sequence[str]],
            vfm: PublishedVFM | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole published pipeline for a :class:`proxyclip.ProxyCLIP`'s CLIP, VFM weights and settings.

    Text embeddings from :func:`query_features`; the image through :func:`published_input` (the
    config's short and long side; no resize when ``short_side`` is None); windows, VFM and CLIP
    through :func:`forward_slide`; labels through :func:`postprocess_result`.

    Args:
        pixels: H x W x 3 uint8 RGB.
        names: for each class, its query names.
        vfm: see :func:`predict_logits`.

    Returns:
        labels (H x W int64) and class probabilities (C x H x W float32), comparable with
        ``model.segment(pixels, names)``.
    """
    cfg = model.config
    text = query_features(model.clip_model, model.tokenizer, [q for synonyms in names for q in synonyms])
    if cfg.short_side is None:
        image = data_preprocessor(np.ascontiguousarray(pixels[..., ::-1]))[0]
    else:
        image = published_input(pixels, cfg.short_side, cfg.long_side)
    logits = predict_logits(model, image, text, tuple(pixels.shape[:2]), vfm)  # Q x H x W
    return postprocess_result(logits[None], query_index(names), cfg.logit_scale, cfg.bg_threshold)
