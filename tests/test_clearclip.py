"""ClearCLIP: equal to its published code (oracle: tests/oracles/clearclip_published.py), and its properties."""

from __future__ import annotations

import pytest
import torch
from oracles import clearclip_published
from published_methods import SIZES, fullsize_model, max_diff, tiny, window_diff

from proxyclip.evaluation.presets import PRESETS
from proxyclip.evaluation.runner import dataset_settings
from proxyclip.model.methods.clearclip import self_self_attention_weights


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_logits_match_published(size):
    assert max_diff(tiny("clearclip"), clearclip_published.predict_logits, size) < 1e-5


def test_window_batch_does_not_change_logits():
    assert max_diff(tiny("clearclip", window_batch=2), clearclip_published.predict_logits, SIZES["many-windows"]) < 1e-5


def test_keeps_no_residual_and_no_feed_forward():
    """Changing the last block's MLP or ln_2 changes nothing; its attention does."""
    model = tiny("clearclip")
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    before = model.window_features(windows)
    block = model.clip_model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        for p in (*block.mlp.parameters(), *block.ln_2.parameters()):
            p.normal_()
    torch.testing.assert_close(model.window_features(windows), before, rtol=0, atol=0)
    with torch.no_grad():
        block.attn.out_proj.weight.mul_(-1.0)  # out_proj is the output: the features flip sign
    torch.testing.assert_close(model.window_features(windows), -before, rtol=0, atol=1e-6)


def test_qq_attention_is_symmetric_before_the_softmax():
    torch.manual_seed(0)
    model = tiny("clearclip")
    clip = model.clip
    x = clip.last_block_input(torch.randn(1, 3, 64, 96))
    block = clip.block(-1)
    q, k, _ = (block.split_heads(t) for t in block.qkv(block.ln_1(x)))
    scores = q @ q.transpose(-2, -1)  # the q-q similarity
    torch.testing.assert_close(scores, scores.transpose(-2, -1))
    weights = self_self_attention_weights(q)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_published_settings_per_dataset():
    """configs/cfg_*.py of mc-lan/ClearCLIP: short side 448, window 448 / stride 224, logit scale 50."""
    voc21 = dataset_settings("clearclip", PRESETS["voc21"])
    assert (voc21["bg_threshold"], voc21["logit_scale"], voc21["short_side"]) == (0.5, 50.0, 448)
    assert (voc21["window"], voc21["stride"], voc21["pad_multiple"], voc21["refine"]) == (448, 224, 16, None)
    assert dataset_settings("clearclip", PRESETS["context60"])["bg_threshold"] == 0.15
    assert dataset_settings("clearclip", PRESETS["coco_object"])["bg_threshold"] == 0.4
    city = dataset_settings("clearclip", PRESETS["cityscapes"])
    assert (city["window"], city["stride"], city["short_side"]) == (224, 224, 448)
    assert dataset_settings("clearclip", PRESETS["ade20k"])["short_side"] == 448


@pytest.mark.fullsize
def test_fullsize_vitb16_one_window_matches_published():
    model = fullsize_model("clearclip")
    torch.manual_seed(0)
    window = torch.randn(1, 3, 336, 336)
    assert window_diff(model, clearclip_published.forward_feature, window) < 1e-4
