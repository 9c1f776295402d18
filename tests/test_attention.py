"""Equations 4-8 on hand-made tensors."""

import math

import pytest
import torch

from proxyclip.model.attention import aggregate_values, masked_softmax, normalised_similarity, proxy_attention


def feats_from_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B x L x C tokens -> B x C x h x w."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def test_similarity_is_cosine_and_scale_invariant():
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])  # 1 x 4 x 2
    a = normalised_similarity(feats_from_tokens(tokens, 2, 2), beta=0.0, gamma=1.0)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 1, 0, s], [1, 1, 0, s], [0, 0, 1, s], [s, s, s, 1.0]])
    torch.testing.assert_close(a[0], expected)


def test_shift_uses_mean_over_all_entries_of_each_window():
    torch.manual_seed(0)
    feats = torch.randn(3, 5, 4, 2)
    beta, gamma = 1.2, 3.0
    a = normalised_similarity(feats, beta, gamma)
    for b in range(3):
        x = torch.nn.functional.normalize(feats[b].flatten(1), dim=0)  # C x L
        s = x.T @ x
        torch.testing.assert_close(a[b], gamma * (s - beta * s.mean()))


def test_windows_do_not_share_statistics():
    torch.manual_seed(0)
    feats = torch.randn(4, 6, 3, 3)
    batched = normalised_similarity(feats, 1.2, 3.0)
    single = torch.cat([normalised_similarity(f[None], 1.2, 3.0) for f in feats])
    torch.testing.assert_close(batched, single)


def test_masked_softmax_masks_negatives_and_normalises():
    a = torch.tensor([[[2.0, -1.0, 0.0, 1.0], [-0.5, 3.0, -2.0, 0.5], [0.0, 0.0, 0.0, -1e-3], [1.0, 1.0, 1.0, 1.0]]])
    attn = masked_softmax(a)
    assert torch.all(attn[a < 0] == 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 4))
    row = torch.tensor([2.0, 0.0, 1.0]).softmax(0)
    torch.testing.assert_close(attn[0, 0, [0, 2, 3]], row)
    torch.testing.assert_close(attn[0, 2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_all_masked_row_keeps_its_maximum_and_has_no_nan():
    a = torch.tensor([[[-1.0, -3.0, -1.0], [0.5, -1.0, 0.2], [-2.0, -2.0, -0.1]]])
    attn = masked_softmax(a)
    assert not torch.isnan(attn).any()
    torch.testing.assert_close(attn[0, 0], torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(attn[0, 2], torch.tensor([0.0, 0.0, 1.0]))
    # a row with a non-negative entry is untouched by the fallback (eq. 7 exactly)
    kept = torch.tensor([0.5, 0.2]).softmax(0)
    torch.testing.assert_close(attn[0, 1], torch.stack([kept[0], torch.tensor(0.0), kept[1]]))


def test_flat_window_gives_no_nan():
    """Identical tokens: beta * mean(S) = 1.2 > S_ij = 1, every entry would be masked."""
    feats = torch.ones(2, 8, 3, 3)
    attn = proxy_attention(feats)
    assert not torch.isnan(attn).any()
    torch.testing.assert_close(attn, torch.full((2, 9, 9), 1 / 9))


def test_zero_feature_vectors_give_no_nan():
    feats = torch.zeros(1, 4, 2, 2)
    feats[0, 0, 0, 0] = 1.0
    assert not torch.isnan(proxy_attention(feats)).any()


def test_shared_attention_equals_per_head_attention():
    torch.manual_seed(0)
    attn = proxy_attention(torch.randn(2, 16, 4, 4))  # 2 x 16 x 16
    heads, head_dim = 4, 8
    v = torch.randn(2, 16, heads * head_dim)
    per_head = torch.cat(
        [attn @ v[..., h * head_dim : (h + 1) * head_dim] for h in range(heads)], dim=-1
    )
    torch.testing.assert_close(aggregate_values(attn, v), per_head)


@pytest.mark.parametrize("beta,gamma", [(1.2, 3.0), (1.0, 2.0), (1.6, 5.0)])
def test_gamma_sharpens_and_beta_sparsifies(beta, gamma):
    torch.manual_seed(1)
    feats = torch.randn(1, 32, 5, 5)
    attn = proxy_attention(feats, beta, gamma)
    sparser = proxy_attention(feats, beta + 0.3, gamma)
    assert (sparser > 0).sum() < (attn > 0).sum()  # a larger shift masks more entries
    sharper = proxy_attention(feats, beta, gamma * 2)
    assert torch.equal(sharper > 0, attn > 0)  # the scale does not change the mask ...
    assert sharper.amax(-1).mean() > attn.amax(-1).mean()  # ... but concentrates each row


def test_ablation_variants():
    from proxyclip.model.attention import ablation_attention

    torch.manual_seed(0)
    feats = torch.randn(2, 16, 4, 5)
    x = torch.nn.functional.normalize(feats.flatten(2), dim=1)
    s = x.transpose(1, 2) @ x  # B x L x L cosine
    torch.testing.assert_close(ablation_attention(feats, "proxy"), proxy_attention(feats))
    torch.testing.assert_close(ablation_attention(feats, "plain"), s.softmax(-1))
    torch.testing.assert_close(ablation_attention(feats, "norm", gamma=3.0), (3.0 * s).softmax(-1))  # shift cancels
    masked = ablation_attention(feats, "mask", alpha=0.2)
    expected = s.masked_fill(s < 0.2, float("-inf")).softmax(-1)
    torch.testing.assert_close(masked, expected)
    with pytest.raises(ValueError):
        ablation_attention(feats, "qk")
