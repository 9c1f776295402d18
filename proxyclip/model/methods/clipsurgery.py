"""CLIPSurgery (Li et al., 2023): a v-v attention path and feature surgery.

Published code: github.com/xmed-lab/CLIP_Surgery (``clip/clip_surgery_model.py``: ``Attention``,
``ResidualAttentionBlock.forward``, ``VisionTransformer.forward``; ``clip/clip.py``:
``clip_feature_surgery``, ``encode_text_with_prompt_ensemble``).

Architecture surgery: a second path through the last 6 blocks (``for i in range(1, 7)``). In each
of them, from ``ln_1`` of the ORIGINAL path's tokens, the original path is the unchanged block and
the new path adds ``out_proj(softmax(v v^T / sqrt(d)) v)`` (per head, no normalisation, one pass)
to its own tokens, with no MLP ("skip ffn for the new path"). The class token is taken from the
original path, the patch tokens from the new one; then ``ln_post`` and ``proj``. CLIP's positional
embedding is resized bilinearly to the patch grid (``VisionTransformer.forward``).

Feature surgery (``clip_feature_surgery``) acts on the image and text embeddings together, so this
method classifies through the segmenter's ``logits`` hook (see :mod:`proxyclip.model.methods`):
with unit-norm embeddings, S = cosine of every token with every class name; class weights
w = softmax(2 * S[class token]) / its mean over the names; the logits are ``S_patch * w`` minus
their mean over the names (the "redundant feature" common to all classes). The text side uses
CLIPSurgery's 85 templates (``encode_text_with_prompt_ensemble``: the 80 OpenAI ImageNet
templates and 5 scene templates).

CLIPSurgery's repository has no benchmark protocol (its demos min-max normalise each class's map
over the image, for heat maps, which is not applied here), so the dataset presets apply.

Differences from the published code, outside its cases: the published positional embedding is
square only and overwritten in place at the first window (a later window of another size resizes
the already-resized one); here every window resizes the original, to its own (rows, cols).
Layer scale (identity in every CLIP of the paper) is applied as the block has it. The published
surgery handles a batch of one; here each window uses its own class token. With fewer than 6
blocks the path runs through all. Of the last block's original path only the class token, which
the surgery reads, is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..._lazy import F, torch
from ..selfself import original_attention, self_self_attention
from . import register_method
from .base import MethodSpec, Windows

if TYPE_CHECKING:
    from ..clip import ClipAdapter

SURGERY_CHOICES = ("on", "off")

# clip/clip.py encode_text_with_prompt_ensemble: the 80 OpenAI ImageNet templates, then these
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


@dataclass(frozen=True)
class CLIPSurgeryOptions:
    # clip/clip_surgery_model.py VisionTransformer.forward: for i in range(1, 7) ("surgery 7")
    surgery_blocks: int = field(default=6, metadata={
        "help": "how many of the last blocks carry the v-v attention path (CLIPSurgery: 6)"})
    # clip/clip.py clip_feature_surgery (the multi-class branch)
    feature_surgery: str = field(default="on", metadata={
        "help": "on: subtract the feature common to all class names from the logits (CLIPSurgery); off: plain "
                "cosine logits of the v-v path", "choices": SURGERY_CHOICES})
    # clip/clip.py clip_feature_surgery: prob = (prob * 2).softmax(-1) (its argument t=2 is unused)
    surgery_scale: float = field(default=2.0, metadata={
        "help": "scale of the class token's cosines in the softmax that weighs the class names (CLIPSurgery: 2)"})

    def __post_init__(self) -> None:
        from ...errors import ProxyCLIPError

        if self.surgery_blocks < 1:
            raise ProxyCLIPError(f"surgery_blocks {self.surgery_blocks} must be at least 1 (CLIPSurgery: 6)")
        if self.feature_surgery not in SURGERY_CHOICES:
            raise ProxyCLIPError(f"unknown feature_surgery {self.feature_surgery!r}; use on or off")


def surgery_tokens(clip: ClipAdapter, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """Class token of the original path and patch tokens of the v-v path, projected.

    Args:
        pixels: N x 3 x H x W, CLIP-normalised.
        blocks: the last ``blocks`` blocks carry the v-v path.

    Returns:
        N x (1 + hw) x E, not normalised.
    """
    start = max(0, clip.depth - blocks)
    x = clip.blocks(clip.embed(pixels, pos_recipe="bilinear"), stop=start)  # N x (1 + hw) x D
    x_new = x
    for i in range(start, clip.depth):
        block = clip.block(i)
        q, k, v = (block.split_heads(t) for t in block.qkv(block.ln_1(x)))  # N x H x L x d each
        vv = self_self_attention(v, v, q.shape[-1] ** -0.5)  # N x H x L x d, softmax(v v^T / sqrt(d)) v
        x_new = x_new + block.ls_1(block.out_proj(block.merge_heads(vv)))  # no MLP on the new path
        if i < clip.depth - 1:
            x = x + block.ls_1(block.out_proj(block.merge_heads(original_attention(q, k, v))))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        else:  # the last block's original path: only its class token is used
            cls = x[:, :1] + block.ls_1(block.out_proj(block.merge_heads(original_attention(q[:, :, :1], k, v))))
            x = cls + block.ls_2(block.mlp(block.ln_2(cls)))  # N x 1 x D
    return clip.project(torch.cat([x[:, :1], x_new[:, 1:]], dim=1))  # N x (1 + hw) x E


def feature_surgery(tokens: torch.Tensor, text: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """``clip_feature_surgery`` (multi-class): cosine logits minus the part common to all names.

    With S = n(tokens) text^T and w = softmax(scale * S_cls) / mean(softmax(scale * S_cls)):
    ``logits = S_patch * w - mean over names of (S_patch * w)``.

    Args:
        tokens: N x (1 + L) x E image embeddings, class token first (any norm).
        text: Q x E unit-norm text embeddings.

    Returns:
        N x L x Q logits of the patches.
    """
    sim = F.normalize(tokens, dim=-1) @ text.to(tokens.dtype).T  # N x (1 + L) x Q
    w = (sim[:, :1] * scale).softmax(dim=-1)  # N x 1 x Q
    w = w / w.mean(dim=-1, keepdim=True)
    weighted = sim[:, 1:] * w  # N x L x Q
    return weighted - weighted.mean(dim=-1, keepdim=True)


class CLIPSurgery:
    """The built method: dense embeddings (``__call__``) and the surgery's logits (``logits``)."""

    def __init__(self, options: CLIPSurgeryOptions):
        self.options = options
        if options.feature_surgery == "off":
            self.logits = None  # the segmenter's plain cosine logits

    def __call__(self, windows: Windows) -> torch.Tensor:
        """N x E x h x w patch embeddings of the v-v path."""
        clip = windows.clip
        tokens = surgery_tokens(clip, windows.pixels, self.options.surgery_blocks)  # N x (1 + hw) x E
        return clip.to_map(tokens[:, 1:], clip.grid(windows.pixels))

    def logits(self, windows: Windows, text: torch.Tensor) -> torch.Tensor:
        """N x Q x h x w logits after feature surgery (text: Q x E unit-norm embeddings)."""
        clip = windows.clip
        tokens = surgery_tokens(clip, windows.pixels, self.options.surgery_blocks)  # N x (1 + hw) x E
        return clip.to_map(feature_surgery(tokens, text, self.options.surgery_scale), clip.grid(windows.pixels))


SPEC = register_method(MethodSpec(
    name="clipsurgery", title="CLIPSurgery", build=CLIPSurgery, options=CLIPSurgeryOptions,
    summary="a v-v attention path over the last 6 blocks, and feature surgery (the part common to all classes "
            "removed from the logits)",
    source="xmed-lab/CLIP_Surgery (clip/clip_surgery_model.py, clip/clip.py clip_feature_surgery and "
           "encode_text_with_prompt_ensemble)",
    extra_templates=SCENE_TEMPLATES,
))
