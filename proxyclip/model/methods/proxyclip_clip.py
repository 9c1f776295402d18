"""ProxyCLIP without a VFM (paper, Table 7): CLIP's own last-block q and k as the proxy's tokens.

"Results of using CLIP's q and k embeddings in PAM": the proxy attention module of eqs. 4-8
(l2-normalised tokens, their cosine similarity, the shift and scale of eq. 6 with beta and gamma,
the mask of eq. 7, the softmax of eq. 8) with CLIP's last-block query or key embeddings as the
tokens instead of a VFM's features:

- ``q-q``: S = n(q) n(q)^T, ``k-k``: S = n(k) n(k)^T, ``q-k``: S = n(q) n(k)^T (queries against
  keys, so S is not symmetric), n = l2-normalisation over the channels;
- then, as ProxyCLIP, ``out_proj(Attn_p @ v)``, no residual, no MLP, ``ln_post`` and ``proj``.

The paper gives the results (Table 7, CLIP ViT-B/16) but not the details, and the published code
(mc-lan/ProxyCLIP) has no trace of this run. What it does have is the same thing done with DINO's
embeddings (``proxyclip_segmentor.py``, the ``dino`` branch: a hook on the last block's ``qkv``,
q and k reshaped with all heads concatenated along the channels and the class token dropped,
then passed as ``ex_feats`` to ``custom_attn``), and that is followed here: q and k of
``ln_1`` of the last block's input, all heads concatenated (D channels, one attention for all
heads, as for a VFM), class token dropped, on CLIP's own patch grid (so v needs no resizing).
beta = 1.2 and gamma = 3.0 are the paper's defaults of PAM; the general settings are ProxyCLIP's
protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..attention import aggregate_values, cosine_similarity, masked_softmax, shift_and_scale
from . import register_method
from .base import MethodSpec, Windows

if TYPE_CHECKING:
    import torch

SIMILARITIES = ("q-q", "k-k", "q-k")  # Table 7's rows


@dataclass(frozen=True)
class ProxyCLIPClipOptions:
    similarity: str = field(default="q-q", metadata={
        "help": "which of CLIP's last-block embeddings make the proxy similarity (Table 7): q-q, k-k or q-k "
                "(queries against keys)", "choices": SIMILARITIES})
    beta: float = field(default=1.2, metadata={"help": "shift factor of eq. 6 (paper: 1.2)"})  # paper, sec. 3.2
    gamma: float = field(default=3.0, metadata={"help": "scale factor of eq. 6 (paper: 3.0)"})  # paper, sec. 3.2

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            from ...errors import ProxyCLIPError

            raise ProxyCLIPError(f"unknown similarity {self.similarity!r}; use one of {', '.join(SIMILARITIES)}")


def clip_proxy_similarity(q: torch.Tensor, k: torch.Tensor, similarity: str, beta: float, gamma: float) -> torch.Tensor:
    """Eqs. 4 and 6 with CLIP's own embeddings as the tokens: the normalised similarity A.

    Args:
        q, k: N x L x D last-block queries and keys of the patches (heads concatenated).
        similarity: "q-q", "k-k" or "q-k" (A is symmetric for the first two).

    Returns:
        N x L x L float32.
    """
    a, b = {"q-q": (q, None), "k-k": (k, None), "q-k": (q, k)}[similarity]
    sim = cosine_similarity(a.transpose(1, 2), None if b is None else b.transpose(1, 2))  # N x L x L
    return shift_and_scale(sim, beta, gamma)


def clip_proxy_attention(q: torch.Tensor, k: torch.Tensor, similarity: str, beta: float, gamma: float) -> torch.Tensor:
    """Eqs. 4-8 with CLIP's own embeddings: N x L x L attention, rows sum to 1, one for all heads."""
    return masked_softmax(clip_proxy_similarity(q, k, similarity, beta, gamma))


def build(options: ProxyCLIPClipOptions):
    def proxyclip_clip(windows: Windows) -> torch.Tensor:
        clip = windows.clip
        x = clip.last_block_input(windows.pixels)  # N x (1 + hw) x D
        block = clip.block(-1)
        q, k, v = block.qkv(block.ln_1(x[:, 1:]))  # N x hw x D each, class token dropped
        attn = clip_proxy_attention(q, k, options.similarity, options.beta, options.gamma)  # N x hw x hw
        z = clip.project(block.out_proj(aggregate_values(attn, v)))  # N x hw x E
        return clip.to_map(z, clip.grid(windows.pixels))  # N x E x h x w

    return proxyclip_clip


SPEC = register_method(MethodSpec(
    name="proxyclip_clip", title="ProxyCLIP (CLIP q/k)", build=build, options=ProxyCLIPClipOptions,
    summary="the proxy attention of eqs. 4-8 on CLIP's own last-block q-q, k-k or q-k similarity, no VFM (Table 7)",
    source="paper (ECCV 2024) appendix E, Table 7; token handling as mc-lan/ProxyCLIP's DINO q/k hook",
))
