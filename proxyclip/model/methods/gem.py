"""GEM, the Grounding Everything Module (Bousselham et al., CVPR 2024): a self-self attention path.

Published code: github.com/WalBouss/GEM (``gem/gem_wrapper.py`` ``GEMWrapper.apply_gem``,
``gem/gem_utils.py`` ``SelfSelfAttention``, ``GEMResidualBlock``, ``modified_vit_forward``).
Beside CLIP's own path, a second path runs through the last ``gem_depth - 1`` blocks (6 of
ViT-B/16's 12). In each of those blocks, from ``ln_1`` of the ORIGINAL path's tokens:

- the original path is the unchanged block (attention and MLP, with residuals);
- the GEM path adds ``out_proj`` of the mean of three self-self attentions (q-q, k-k, v-v, per
  head: l2-normalise, ``gem_iterations`` rounds of ``x <- softmax(x x^T * t) x``, normalise again,
  then ``softmax(x x^T * t) v``) to its own tokens; no MLP. ``t`` is the inverse temperature:
  adaptive by default (the window's mean token norm of ``ln_1(x)`` times ``d^-1/2``).

The GEM path's patch tokens, ``ln_post`` and ``proj``, are the dense embeddings. CLIP's positional
embedding is resized as GEM's ``modified_vit_forward`` does (timm's ``resample_abs_pos_embed``:
bicubic to the exact grid, antialiased).

The evaluation protocol is not in GEM's repository (its ``GEMWrapper.forward`` min-max normalises
each class's map over the image, for heat maps, with the single prompt "a photo of a {}."). The
published code that scores GEM on these benchmarks is ClearCLIP's (github.com/mc-lan/ClearCLIP,
``clearclip_segmentor.py`` with ``model_type='GEM'``, which calls GEM's code through
``gem.create_gem_model``, and ``configs/cfg_*.py``): cosine logits with the 80 OpenAI templates,
logit scale 50, 448-px windows with stride 224 (Cityscapes 224 / 224), windows padded to the patch
size, images resized to a short side of 448, background thresholds VOC21 0.5, Context60 0.15,
COCO-Object 0.4. Those are GEM's ``settings`` and ``dataset_settings`` here. ClearCLIP runs GEM
with ``ignore_residual=True`` (its ``base_config.py``): the GEM path then keeps only the last
block's self-self attention; ``--gem-residual drop`` reproduces that, the default keeps GEM's own.
ClearCLIP's class-name files equal the presets' except for the background of VOC21 and
COCO-Object, which ClearCLIP queries with the single name "background" (the presets, as ProxyCLIP,
with a list of stuff names); the presets' names are used.

Differences from the published code, outside its cases: with a CLIP of fewer than
``gem_depth - 1`` blocks the path runs through all of them (the published code fails); the last
block's original path, whose output GEM discards, is not computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._lazy import torch
from ..selfself import original_attention, self_self_attention, window_temperature
from . import register_method
from .base import MethodSpec, Windows

RESIDUAL_CHOICES = ("keep", "drop")


@dataclass(frozen=True)
class GEMOptions:
    # gem/gem.py create_gem_model(gem_depth=7); gem_wrapper.py apply_gem: resblocks[-i] for i in 1..depth-1
    gem_depth: int = field(default=7, metadata={
        "help": "GEM's depth: the self-self path runs through the last gem_depth - 1 blocks (GEM: 7, i.e. 6 blocks)"})
    # gem/gem.py create_gem_model(ss_attn_iter=1)
    gem_iterations: int = field(default=1, metadata={
        "help": "rounds of self-self attention before the final one (GEM's ss_attn_iter: 1)"})
    # gem/gem.py create_gem_model(ss_attn_temp=None): SelfSelfAttention's adaptive inv_temp
    gem_temp: float = field(default=0.0, metadata={
        "help": "inverse temperature multiplying the self-self cosines (GEM's ss_attn_temp); 0: adaptive, "
                "the window's mean token norm / sqrt(head dim) (GEM's default)"})
    # gem/gem_utils.py GEMResidualBlock: x_gem + attn ("keep"); ClearCLIP's configs/base_config.py
    # ignore_residual=True ("drop")
    gem_residual: str = field(default="keep", metadata={
        "help": "keep: the GEM path adds each block's output to its tokens (GEM's code); drop: it keeps only "
                "the last block's output (as ClearCLIP's repository runs GEM)", "choices": RESIDUAL_CHOICES})

    def __post_init__(self) -> None:
        from ...errors import ProxyCLIPError

        if self.gem_depth < 2:
            raise ProxyCLIPError(f"gem_depth {self.gem_depth} leaves no block on the GEM path; use 2 or more (GEM: 7)")
        if self.gem_iterations < 0 or self.gem_temp < 0:
            raise ProxyCLIPError("gem_iterations and gem_temp must not be negative")
        if self.gem_residual not in RESIDUAL_CHOICES:
            raise ProxyCLIPError(f"unknown gem_residual {self.gem_residual!r}; use one of {', '.join(RESIDUAL_CHOICES)}")


def gem_tokens(windows: Windows, options: GEMOptions) -> torch.Tensor:
    """The GEM path's tokens after the last block, before ``ln_post``: N x (1 + hw) x D."""
    clip = windows.clip
    start = max(0, clip.depth - (options.gem_depth - 1))  # first block of the GEM path
    x = clip.blocks(clip.embed(windows.pixels, pos_recipe="antialias"), stop=start)  # N x (1 + hw) x D
    x_gem = x
    for i in range(start, clip.depth):
        block = clip.block(i)
        last = i == clip.depth - 1
        y = block.ln_1(x)  # N x L x D, the original path's tokens
        q, k, v = (block.split_heads(t) for t in block.qkv(y))  # N x H x L x d each
        if options.gem_residual == "keep" or last:  # "drop": only the last block's output survives
            if options.gem_temp > 0:
                t = float(options.gem_temp)
            else:
                t = window_temperature(y, q.shape[-1]).repeat(3, 1, 1, 1)  # 3N x 1 x 1 x 1, per window
            paths = torch.cat([v, k, q])  # 3N x H x L x d: the v-v, k-k and q-q paths batched
            ss = self_self_attention(paths, v.repeat(3, 1, 1, 1), t, options.gem_iterations, normalize=True)
            ss = ss.unflatten(0, (3, -1)).mean(dim=0)  # N x H x L x d, (v-v + k-k + q-q) / 3
            out = block.ls_1(block.out_proj(block.merge_heads(ss)))  # N x L x D
            x_gem = x_gem + out if options.gem_residual == "keep" else out
        if not last:  # the original path feeds the next block's attention
            x = x + block.ls_1(block.out_proj(block.merge_heads(original_attention(q, k, v))))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x_gem


def build(options: GEMOptions):
    def gem(windows: Windows) -> torch.Tensor:
        clip = windows.clip
        z = clip.project(gem_tokens(windows, options)[:, 1:])  # N x hw x E
        return clip.to_map(z, clip.grid(windows.pixels))  # N x E x h x w

    return gem


# The protocol of ClearCLIP's repository, which scores GEM's code (see the module docstring).
CLEARCLIP_SETTINGS = {
    "logit_scale": 50.0,  # clearclip_segmentor.py ClearCLIPSegmentation(logit_scale=50)
    "window": 448,  # clearclip_segmentor.py slide_crop=448
    "stride": 224,  # clearclip_segmentor.py slide_stride=224
    "pad_multiple": 16,  # forward_slide: compute_padsize(H, W, self.patch_size[0]), CLIP ViT-B/16's patch
    "short_side": 448,  # configs/cfg_*.py Resize(scale=(2048, 448), keep_ratio=True)
    "long_side": 2048,
}
CLEARCLIP_DATASET_SETTINGS = {
    "voc21": {"bg_threshold": 0.5},  # configs/cfg_voc21.py prob_thd=0.5
    "voc20": {"bg_threshold": 0.0},  # configs/cfg_voc20.py (prob_thd default 0.0)
    "context60": {"bg_threshold": 0.15},  # configs/cfg_context60.py prob_thd=0.15
    "context59": {"bg_threshold": 0.0},  # configs/cfg_context59.py
    "coco_object": {"bg_threshold": 0.4},  # configs/cfg_coco_object.py prob_thd=0.4
    "coco_stuff": {"bg_threshold": 0.0},  # configs/cfg_coco_stuff164k.py
    "cityscapes": {"window": 224, "stride": 224, "short_side": 448},  # configs/cfg_city_scapes.py slide_crop=224
    "ade20k": {"window": 448, "stride": 224, "short_side": 448},  # configs/cfg_ade20k.py
}

SPEC = register_method(MethodSpec(
    name="gem", title="GEM", build=build, options=GEMOptions,
    summary="the self-self (q-q, k-k, v-v) attention path of the Grounding Everything Module over the last blocks",
    source="WalBouss/GEM (gem_wrapper.py, gem_utils.py, gem.py); protocol: mc-lan/ClearCLIP (clearclip_segmentor.py, "
           "configs/cfg_*.py), which runs GEM's code",
    settings=CLEARCLIP_SETTINGS,
    dataset_settings=CLEARCLIP_DATASET_SETTINGS,
))
