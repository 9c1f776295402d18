"""A deliberately straightforward transcription of the PUBLISHED CLIPSurgery inference. Not for users.

The test oracle for :mod:`proxyclip.model.methods.clipsurgery` and the "published loop" of
``benchmarks/bench_methods.py``: one window at a time, every step as the published code writes it.

What is transcribed (github.com/xmed-lab/CLIP_Surgery, our own code written from reading it):
``clip/clip_surgery_model.py`` ``Attention.forward`` (ViT settings: v-v attention, no
normalisation), ``ResidualAttentionBlock.forward`` (the dual path), ``VisionTransformer.forward``
(surgery on the last 6 blocks, positional embedding resized bilinearly, class token from the
original path); ``clip/clip.py`` ``clip_feature_surgery`` and ``encode_text_with_prompt_ensemble``.
The published code replaces the attention modules of its own CLIP in place; here the same
computation runs as functions on an open_clip model's modules, which are left untouched, with
sequence-first (L x B x D) tokens as the published code uses.

Two things are not reproduced: the published code writes the resized positional embedding back
into the model (``self.positional_embedding.data = ...``), so that a later window of another size
would be resized from the already-resized one; here every window resizes the original (the same
numbers as long as all windows have one size, as in the tests). And it handles square grids only
(``new_side = int(sqrt(L - 1))``), as here.

The published repository maps the similarity to pixels for heat maps (``get_similarity_map``:
min-max over the image, then bilinear resizing); for segmentation, :func:`window_logits` resizes
the surgery's similarity bilinearly to the window, as every method's logits are resized.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

SCENE_TEMPLATES = ["there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
                   "this is the {} in the scene.", "this is one {} in the scene."]


def prompt_templates() -> list[str]:
    """``encode_text_with_prompt_ensemble``'s 85 templates: OpenAI's 80 ImageNet ones (same order), then 5."""
    return [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES] + SCENE_TEMPLATES


def surgery_attention(attn_layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``Attention.forward`` (settings ''), with the weights of ``attn_layer`` (nn.MultiheadAttention).

    Args:
        x: B x N x C (batch first: the published ``ResidualAttentionBlock.attention`` transposes).

    Returns:
        [v-v path output, original output], B x N x C each, after ``proj``.
    """
    num_heads = attn_layer.num_heads
    B, N, C = x.shape
    scale = (C // num_heads) ** -0.5
    qkv = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias)
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    # original self-attention for the original path
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    # replace k & q by v
    k = v
    q = k
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(B, N, C)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)  # clip_surgery
    return [attn_layer.out_proj(x), attn_layer.out_proj(x_ori)]


def surgery_block(block: nn.Module, x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """``ResidualAttentionBlock.forward`` of a block whose attention is the surgery ``Attention``.

    Args:
        x: L x B x D tokens, or [new path, original path] from the previous surgery block.
    """
    def attention(y: torch.Tensor) -> list[torch.Tensor]:  # ResidualAttentionBlock.attention
        new, ori = surgery_attention(block.attn, y.transpose(0, 1))
        return [new.transpose(0, 1), ori.transpose(0, 1)]

    if isinstance(x, list):
        x, x_ori = x
        x_res, x_ori_res = attention(block.ln_1(x_ori))
        x_ori = x_ori + x_ori_res
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        x = x + x_res  # skip ffn for the new path
        return [x, x_ori]
    # start of the dual path
    x_res, x_ori_res = attention(block.ln_1(x))
    x_ori = x + x_ori_res
    x_ori = x_ori + block.mlp(block.ln_2(x_ori))
    x = x + x_res
    return [x, x_ori]


def encode_image(visual: nn.Module, x: torch.Tensor, surgery_blocks: int = 6) -> torch.Tensor:
    """``VisionTransformer.forward`` after the surgery of its last 6 blocks.

    Args:
        x: B x 3 x H x W (H == W), CLIP-normalised.

    Returns:
        B x (1 + h*w) x E: class token from the original path, patch tokens from the new one.
    """
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1)
    positional_embedding = visual.positional_embedding
    side = int((positional_embedding.shape[0] - 1) ** 0.5)
    new_side = int((x.shape[1] - 1) ** 0.5)
    if side != new_side:  # (published: written back into the model)
        new_pos = positional_embedding[1:, :].reshape(-1, side, side, x.shape[-1]).permute(0, 3, 1, 2)
        new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
        new_pos = new_pos.reshape(-1, x.shape[-1], new_side * new_side).transpose(1, 2)
        positional_embedding = torch.cat([positional_embedding[:1, :], new_pos[0]], 0)
    x = x + positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)

    blocks = visual.transformer.resblocks
    surgery = {len(blocks) - i for i in range(1, surgery_blocks + 1)}  # resblocks[-i], i = 1 .. 6
    batch_first = visual.transformer.batch_first
    x = x.permute(1, 0, 2)  # NLD -> LND
    for index, blk in enumerate(blocks):
        if index in surgery:
            x = surgery_block(blk, x)
        else:
            x = blk(x.permute(1, 0, 2)).permute(1, 0, 2) if batch_first else blk(x)
    x, x_ori = x
    x[0, :, :] = x_ori[0, :, :]  # clip_surgery
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x)
    return x @ visual.proj


def clip_feature_surgery(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``clip_feature_surgery`` without redundant features (a batch of one, as published).

    Args:
        image_features: 1 x (1 + N) x C unit-norm.
        text_features: T x C unit-norm.

    Returns:
        1 x (1 + N) x T.
    """
    # weights to restrain influence of obvious classes on others
    prob = image_features[:, :1, :] @ text_features.t()
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    # element-wise multiplied features
    b, n_t, n_i, c = image_features.shape[0], text_features.shape[0], image_features.shape[1], image_features.shape[2]
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats *= w.reshape(1, 1, n_t, 1)
    redundant_feats = feats.mean(2, keepdim=True)  # along cls dim
    feats = feats - redundant_feats
    # sum the element-wise multiplied features as cosine similarity
    return feats.sum(-1)


@torch.no_grad()
def encode_text_with_prompt_ensemble(clip_model: nn.Module, tokenizer: object, texts: list[str]) -> torch.Tensor:
    """``encode_text_with_prompt_ensemble``: 85 templates, normalise, mean, normalise. Returns T x E."""
    device = clip_model.visual.proj.device
    text_features = []
    for t in texts:
        prompted_t = tokenizer([template.format(t) for template in prompt_templates()]).to(device)
        class_embeddings = clip_model.encode_text(prompted_t)
        class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
        class_embedding = class_embeddings.mean(dim=0)
        class_embedding = class_embedding / class_embedding.norm()
        text_features.append(class_embedding)
    return torch.stack(text_features, dim=1).to(device).t()


@torch.no_grad()
def window_logits(clip_model: nn.Module, img: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """One window, as the published demo computes its similarity, resized to the window.

    Args:
        img: 1 x 3 x H x H, CLIP-normalised.
        text_features: T x E unit-norm.

    Returns:
        1 x T x H x H.
    """
    image_features = encode_image(clip_model.visual, img)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    similarity = clip_feature_surgery(image_features, text_features)[:, 1:, :]  # 1 x N x T
    side = int(similarity.shape[1] ** 0.5)
    sm = similarity.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # 1 x T x side x side
    return F.interpolate(sm, img.shape[-2:], mode="bilinear")
