"""Self-self attention (CLIPSurgery's v-v attention, GEM's q-q, k-k and v-v attention), as pure functions.

Notation: B windows, H heads, L tokens (class token first), d channels per head, D = H * d
(heads split and merged by :class:`proxyclip.model.clip.Block`).

    CLIPSurgery:  out = softmax(v v^T * d^-1/2) v                               (one pass, no norm)
    GEM:          x_0 = x in {q, k, v};  x_{i+1} = softmax(n(x_i) n(x_i)^T * t) n(x_i)    (iterations)
                  out = mean over x in {q, k, v} of softmax(n(x_T) n(x_T)^T * t) v
                  t = mean_j |ln_1(x)_j| * d^-1/2 (per window), n = l2-normalisation per head

Every product runs through ``scaled_dot_product_attention`` with the scale folded into the
queries, so no L x L matrix is kept alive on fused kernels.
"""

from __future__ import annotations

from .._lazy import F, torch


def self_self_attention(
    x: torch.Tensor,
    values: torch.Tensor,
    scale: float | torch.Tensor,
    iterations: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """``softmax(x' x'^T * scale) @ values``, x' = x after ``iterations`` rounds of self-self attention.

    Args:
        x: B x H x L x d, the tokens that attend to each other (q, k or v of one block).
        values: B x H x L x d, what the last attention pools (v).
        scale: a float, or a B x 1 x 1 x 1 tensor (one per window), multiplying the logits.
        iterations: rounds of ``x <- softmax(x x^T * scale) x`` before the last attention (GEM's).
        normalize: l2-normalise x (per head) before every attention (GEM's; CLIPSurgery does not).

    Returns:
        B x H x L x d.
    """
    for _ in range(iterations):
        if normalize:
            x = F.normalize(x, dim=-1)
        x = F.scaled_dot_product_attention(x * scale, x, x, scale=1.0)  # B x H x L x d
    if normalize:
        x = F.normalize(x, dim=-1)
    return F.scaled_dot_product_attention(x * scale, x, values, scale=1.0)  # B x H x L x d


def window_temperature(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """GEM's adaptive inverse temperature: the mean token norm of ``ln_1(x)`` times ``d^-1/2``.

    Args:
        y: B x L x D, the block's ``ln_1`` output (class token included).

    Returns:
        B x 1 x 1 x 1, one per window.
    """
    return (y.norm(dim=-1).mean(dim=-1) * head_dim**-0.5).view(-1, 1, 1, 1)  # B x 1 x 1 x 1


def original_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The block's own attention ``softmax(q k^T / sqrt(d)) v``, B x H x L x d (L queries) -> B x H x L x d."""
    return F.scaled_dot_product_attention(q, k, v)


__all__ = ["original_attention", "self_self_attention", "window_temperature"]
