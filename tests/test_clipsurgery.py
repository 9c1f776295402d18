"""CLIPSurgery equals its published code (oracle: tests/oracles/clipsurgery_published.py), and what
makes it CLIPSurgery."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from oracles import clipsurgery_published as ref

from proxyclip import ProxyCLIPConfig
from proxyclip.model.methods.clipsurgery import feature_surgery

CLASSES = [["cat", "kitten"], ["dog"], ["grass"], ["sky"]]


@pytest.mark.parametrize("side", [112, 64, 48])  # grid 7 (embedding upsampled), 4 (native), 3 (downsampled)
@pytest.mark.parametrize("blocks", [6, 1])  # 6 on a 2-block CLIP: the dual path through all blocks
def test_window_logits_match_published(side, blocks):
    model = tiny_model(method="clipsurgery", surgery_blocks=blocks)
    torch.manual_seed(side)
    text = F.normalize(torch.randn(5, model.clip.embed_dim), dim=-1)  # Q x E
    windows = torch.randn(2, 3, side, side)
    ours = model.window_logits(windows, text)  # 2 x Q x side x side, batched

    def published(window: torch.Tensor) -> torch.Tensor:
        if blocks == 6:
            return ref.window_logits(model.clip_model, window[None], text)
        image = F.normalize(ref.encode_image(model.clip_model.visual, window[None], surgery_blocks=blocks), dim=-1)
        sim = ref.clip_feature_surgery(image, text)[:, 1:]  # 1 x N x Q
        grid = int(sim.shape[1] ** 0.5)
        return F.interpolate(sim.reshape(1, grid, grid, -1).permute(0, 3, 1, 2), (side, side), mode="bilinear")

    expected = torch.cat([published(w) for w in windows])
    assert ours.shape == expected.shape
    assert float((ours - expected).abs().max()) < 1e-5


def test_text_uses_clipsurgerys_85_templates():
    model = tiny_model(method="clipsurgery")
    queries = [q for names in CLASSES for q in names]
    expected = ref.encode_text_with_prompt_ensemble(model.clip_model, model.tokenizer, queries)  # Q x E
    ours = model.encode_classes(CLASSES)
    assert float((ours - expected).abs().max()) < 1e-5
    plain = model.with_config(method="maskclip")  # the same CLIP, the 80 OpenAI templates
    assert float((plain.encode_classes(CLASSES) - ours).abs().max()) > 1e-4  # not served from the cache


def test_feature_surgery_removes_what_all_classes_share():
    """The feature common to every class name (mean over names) is removed: logits sum to zero over
    the names, adding a shared direction to every text embedding changes nothing when the class
    token sees every name alike, and the ranking of names equals the weighted cosine's."""
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 12, 16)  # N x (1 + L) x E
    text = F.normalize(torch.randn(5, 16), dim=-1)
    logits = feature_surgery(tokens, text)  # N x L x Q
    torch.testing.assert_close(logits.sum(-1), torch.zeros(2, 12), atol=1e-6, rtol=0)
    # class token orthogonal to the texts: every weight is 1, so the surgery subtracts the mean cosine
    tokens_flat = tokens.clone()
    tokens_flat[:, 0] = 0.0
    tokens_flat[:, 0, 0] = 1.0
    text_flat = F.normalize(torch.cat([torch.zeros(5, 1), torch.randn(5, 15)], dim=1), dim=-1)
    cos = F.normalize(tokens_flat[:, 1:], dim=-1) @ text_flat.T
    torch.testing.assert_close(feature_surgery(tokens_flat, text_flat), cos - cos.mean(-1, keepdim=True))
    shared = torch.zeros(16)
    shared[0] = 0.7  # a component every class name shares: invisible to the class token's softmax here
    with_shared = text_flat + shared
    torch.testing.assert_close(feature_surgery(tokens_flat, with_shared),
                               feature_surgery(tokens_flat, text_flat), atol=1e-5, rtol=1e-5)


def test_surgery_can_be_switched_off_and_changes_logits():
    model = tiny_model(method="clipsurgery")
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    text = F.normalize(torch.randn(4, model.clip.embed_dim), dim=-1)
    plain = model.with_config(feature_surgery="off")
    cos = torch.einsum("nehw,qe->nqhw", plain.window_features(windows), text)
    torch.testing.assert_close(plain.window_logits(windows, text),
                               F.interpolate(cos, size=(112, 112), mode="bilinear", align_corners=False))
    assert not torch.allclose(model.window_logits(windows, text), plain.window_logits(windows, text), atol=1e-3)
    with pytest.raises(Exception, match="feature_surgery"):
        ProxyCLIPConfig.create(method="clipsurgery", feature_surgery="maybe")


@pytest.mark.fullsize
def test_fullsize_vitb16_window_matches_published():
    """CLIP ViT-B/16 (OpenAI architecture, QuickGELU) with random weights, one 336-px window."""
    from proxyclip import ProxyCLIP

    model = ProxyCLIP.build(ProxyCLIPConfig.create(method="clipsurgery"), random_weights=True)
    torch.manual_seed(0)
    window = torch.randn(1, 3, 336, 336)
    text = F.normalize(torch.randn(10, model.clip.embed_dim), dim=-1)
    ours = model.window_logits(window, text)
    expected = ref.window_logits(model.clip_model, window, text)
    assert float((ours - expected).abs().max()) < 1e-4
