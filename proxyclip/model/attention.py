"""The proxy attention of ProxyCLIP, equations 4-8 of the paper, as pure functions.

Notation: B windows, L = h * w VFM patches per window, C VFM channels, D CLIP width.

    S      = x x^T                        cosine similarity of l2-normalised VFM tokens (eq. 4)
    A      = gamma * (S - beta * mean(S)) mean over all L x L entries of one window  (eq. 6)
    M_ij   = -inf where A_ij < 0, else 0                                           (eq. 7)
    Attn_p = softmax(A + M) over keys                                              (eq. 8)
    z      = out_proj(Attn_p @ v)         one attention shared by every head       (eq. 5)

Because the same attention serves all heads, ``Attn_p @ v`` on the (B, L, D) value tensor
equals the per-head products concatenated over heads: no per-head copy of the L x L matrix
is ever made.

A row whose every entry would be masked (only possible when beta * mean(S) exceeds the row's
largest similarity, e.g. a window of one flat colour) would give NaN in the published code.
Here such a row keeps its largest entries instead: the mask threshold is min(0, max_j A_ij),
which is identical to eq. 7 for every row that has a non-negative entry.
"""

from __future__ import annotations

from collections.abc import Callable

from .._lazy import F, torch


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's ``x x^T`` for l2-normalised tokens; of two token sets (``a`` the queries, ``b`` the
    keys) when ``b`` is given, as in Table 7's q-k similarity.

    Args:
        a: B x C x L tokens, channels first (any real dtype).
        b: B x C x M tokens, or None for ``a`` itself.

    Returns:
        B x L x M float32 cosine similarities.
    """
    x = F.normalize(a.float(), dim=1)  # B x C x L
    y = x if b is None else F.normalize(b.float(), dim=1)  # B x C x M
    return torch.bmm(x.transpose(1, 2), y)  # B x L x M


def shift_and_scale(sim: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Eq. 6: ``gamma * (S - beta * mean(S))``, the mean over all entries of each window's matrix.

    Args:
        sim: B x L x M similarities.

    Returns:
        B x L x M.
    """
    mean = sim.mean(dim=(1, 2), keepdim=True)  # B x 1 x 1, one statistic per window
    return (sim - beta * mean) * gamma


def normalised_similarity(feats: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Eqs. 4 and 6: the shifted and scaled cosine similarity of VFM tokens.

    Args:
        feats: B x C x h x w VFM patch features (any real dtype).
        beta: shift factor (1.2 in the paper).
        gamma: scale factor (3.0 in the paper).

    Returns:
        A: B x L x L float32, L = h * w; the mean is taken per window. It is computed in
        float32 whatever the features' dtype, since the mask of eq. 7 is a hard threshold.
    """
    return shift_and_scale(cosine_similarity(feats.flatten(2)), beta, gamma)  # B x L x L


def masked_softmax(a: torch.Tensor) -> torch.Tensor:
    """Eqs. 7 and 8: mask the negative entries of ``a`` with -inf, softmax over the last axis.

    A row with no non-negative entry keeps its maximal entries (see the module docstring),
    so the result never contains NaN for finite input.

    Args:
        a: ... x L x L normalised similarity.

    Returns:
        ... x L x L attention, each row summing to 1.
    """
    threshold = a.amax(dim=-1, keepdim=True).clamp(max=0)  # ... x L x 1
    return a.masked_fill(a < threshold, float("-inf")).softmax(dim=-1)


def proxy_attention(feats: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """Eqs. 4-8: the proxy attention ``Attn_p`` from VFM features.

    Args:
        feats: B x C x h x w VFM patch features.

    Returns:
        B x L x L attention (L = h * w), rows sum to 1; shared by all CLIP heads.
    """
    return masked_softmax(normalised_similarity(feats, beta, gamma))


# The attention of the ablations in Tables 4 and 6 of the paper; "proxy" is the method.
# "vfm_attn" (Table 4, lower half) is the VFM's own last-layer attention, which comes from the VFM's
# last block (:func:`mean_head_attention` of its queries and keys), not from its output features.
ATTENTION_VARIANTS = ("proxy", "plain", "norm", "mask", "vfm_attn")


def ablation_attention(
    feats: torch.Tensor, variant: str, beta: float = 1.2, gamma: float = 3.0, alpha: float = 0.0
) -> torch.Tensor:
    """The proxy attention or one of its ablations, B x C x h x w -> B x L x L.

    - "proxy": eqs. 4-8 (normalisation and masking), the method;
    - "plain": eq. 4 alone, softmax(S) (Table 4, neither);
    - "norm": eqs. 6 and 8 without the mask, softmax(A) (Table 4, normalisation only);
    - "mask": eq. 9, a fixed threshold on the raw similarity: softmax over the entries with
      S_ij >= alpha (Table 6, masking only).

    ("vfm_attn" is not computed from features; see :data:`ATTENTION_VARIANTS`.)
    """
    if variant == "proxy":
        return proxy_attention(feats, beta, gamma)
    if variant == "plain":
        return normalised_similarity(feats, beta=0.0, gamma=1.0).softmax(dim=-1)
    if variant == "norm":
        return normalised_similarity(feats, beta, gamma).softmax(dim=-1)
    if variant == "mask":
        return masked_softmax(normalised_similarity(feats, beta=0.0, gamma=1.0) - alpha)
    if variant == "vfm_attn":
        raise ValueError("the 'vfm_attn' attention is the VFM's own last-layer attention, not a function of its "
                         "features: take it from the VFM wrapper's last_attention()")
    raise ValueError(f"unknown attention variant {variant!r}; use one of {', '.join(ATTENTION_VARIANTS)}")


def aggregate_values(attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Eq. 5 without the projection: ``Attn_p @ v`` for all heads at once.

    Args:
        attn: B x L x L attention (one for every head).
        values: B x L x D CLIP values, heads concatenated along D.

    Returns:
        B x L x D re-aggregated values.
    """
    return torch.bmm(attn.to(values.dtype), values)  # B x L x D


def mean_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A transformer's own self-attention, averaged over its heads (Table 4, lower half):
    ``mean_h softmax(q_h k_h^T * scale + bias_h)``, one head at a time (one L x M matrix alive).

    Args:
        q: B x H x L x d queries of one block (after any q-norm).
        k: B x H x M x d keys.
        scale: the block's logit scale, ``d ** -0.5``.
        bias: head index -> B x L x M additive logit bias (SAM's relative positions), or None.

    Returns:
        B x L x M float32 attention, each row summing to 1.
    """
    total = None
    for h in range(q.shape[1]):
        logits = torch.bmm(q[:, h].float() * scale, k[:, h].float().transpose(1, 2))  # B x L x M
        if bias is not None:
            logits = logits + bias(h).float()
        attn = logits.softmax(dim=-1)
        total = attn if total is None else total + attn
    return total / q.shape[1]
