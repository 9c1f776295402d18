"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last-block values re-aggregated by a VFM's proxy attention.

Published code: github.com/mc-lan/ProxyCLIP (``proxyclip_segmentor.py``, ``custom_attn``). The
value map of the last block (class token dropped) is resized bilinearly to the VFM's patch grid;
the proxy attention of eqs. 4-8 (:mod:`proxyclip.model.attention`), one for all heads, pools it;
then out_proj, no residual and no MLP, ``ln_post`` and ``proj``. ``attention`` selects the
paper's ablations of the attention (Tables 4 and 6).

``attention="vfm_attn"`` (Table 4, lower half: "attention scores from the last self-attention
layer of each VFM") replaces Attn_p by the VFM's own last-block attention
``mean_h softmax(q_h k_h^T / sqrt(d))`` over its patch tokens (``last_attention`` of the VFM
wrappers in :mod:`proxyclip.model.vfm`). The paper does not say how heads are combined, and the
published code keeps no trace of this run beyond a hook that reads DINO's last-block q and k
with the class token dropped: the heads' attentions are averaged here (each head's is a
distribution over patches, so their mean is one too), and the class and register tokens are
dropped before the softmax. SAM's last block (a global one) includes its relative-position bias.
beta and gamma do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..._lazy import F
from ..attention import ATTENTION_VARIANTS, ablation_attention, aggregate_values
from . import register_method
from .base import MethodSpec, Windows

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ProxyCLIPOptions:
    beta: float = field(default=1.2, metadata={"help": "shift factor of eq. 6 (paper: 1.2)"})
    gamma: float = field(default=3.0, metadata={"help": "scale factor of eq. 6 (paper: 3.0)"})
    attention: str = field(default="proxy", metadata={
        "help": "proxy (the method, eqs. 4-8) or an ablation: plain (softmax of the similarity, Table 4), "
                "norm (normalisation without mask, Table 4), mask (fixed threshold --alpha, no normalisation, Table 6), "
                "vfm_attn (the VFM's own last-layer self-attention averaged over heads, Table 4)",
        "choices": ATTENTION_VARIANTS})
    alpha: float = field(default=0.0, metadata={"help": "similarity threshold of the 'mask' ablation (eq. 9)"})

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_VARIANTS:
            from ...errors import ProxyCLIPError

            raise ProxyCLIPError(f"unknown attention {self.attention!r}; use one of {', '.join(ATTENTION_VARIANTS)}")


def last_block_values(windows: Windows) -> torch.Tensor:
    """The value embeddings of the last block's patch tokens as a map, N x D x h x w (heads
    concatenated along D, head-major, as in the attention)."""
    clip = windows.clip
    x = clip.last_block_input(windows.pixels)  # N x (1 + hw) x D
    block = clip.block(-1)
    _, _, v = block.qkv(block.ln_1(x[:, 1:]))  # N x hw x D
    return clip.to_map(v, clip.grid(windows.pixels))  # N x D x h x w


def build(options: ProxyCLIPOptions):
    def proxyclip(windows: Windows) -> torch.Tensor:
        if options.attention == "vfm_attn":  # Table 4, lower half: the VFM's own last-layer attention
            pixels = windows.vfm_pixels()  # N x 3 x h x w
            attn = windows.vfm.last_attention(pixels)  # N x L x L, rows sum to 1
            grid = windows.vfm.grid(pixels)
        else:
            feats = windows.vfm_features()  # N x C x h' x w'
            grid = tuple(feats.shape[-2:])
            attn = ablation_attention(feats, options.attention, options.beta, options.gamma, options.alpha)  # N x L x L
        v = F.interpolate(last_block_values(windows), size=grid, mode="bilinear", align_corners=False)  # N x D x h' x w'
        tokens = aggregate_values(attn, v.flatten(2).transpose(1, 2))  # N x L x D
        z = windows.clip.project(windows.clip.block(-1).out_proj(tokens))  # N x L x E
        return windows.clip.to_map(z, grid)  # N x E x h' x w'

    return proxyclip


SPEC = register_method(MethodSpec(
    name="proxyclip", title="ProxyCLIP", build=build, options=ProxyCLIPOptions, needs_vfm=True,
    summary="CLIP's last-block values pooled by the proxy attention of a VFM's patch similarities",
    source="mc-lan/ProxyCLIP; paper (ECCV 2024) sec. 3, Tables 4 and 6",
))
