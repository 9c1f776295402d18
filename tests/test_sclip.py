"""SCLIP: equal to its published code (oracle: tests/oracles/sclip_published.py), and its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import clearclip_published, sclip_published
from published_methods import CLASSES, SIZES, fullsize_model, max_diff, tiny, window_diff

from proxyclip.evaluation.presets import PRESETS
from proxyclip.evaluation.runner import dataset_settings
from proxyclip.model.methods.sclip import correlative_attention, correlative_attention_weights


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_logits_match_published(size):
    assert max_diff(tiny("sclip"), sclip_published.predict_logits, size) < 1e-5


def test_logits_match_published_with_pamr():
    assert max_diff(tiny("sclip", refine="pamr"), sclip_published.predict_logits, SIZES["several-windows"]) < 1e-5


def test_logits_match_clearclips_reading_of_sclip():
    """ClearCLIP's repository runs SCLIP too (model_type='SCLIP', with the residual and feed-forward)."""
    model = tiny("sclip", pad_multiple=16)  # ClearCLIP's slide pads to the patch size
    diff = max_diff(model, clearclip_published.predict_logits, SIZES["several-windows"],
                    model_type="SCLIP", ignore_residual=False)
    assert diff < 1e-5


def test_window_batch_does_not_change_logits():
    for batch in (1, 3):
        assert max_diff(tiny("sclip", window_batch=batch), sclip_published.predict_logits, SIZES["many-windows"]) < 1e-5


def test_attention_rows_sum_to_two_and_the_fused_form_is_the_matrix():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)  # B x H x L x d each
    weights = correlative_attention_weights(q, k)  # B x H x L x L
    torch.testing.assert_close(weights.sum(-1), torch.full((2, 4, 10), 2.0))
    torch.testing.assert_close(correlative_attention(q, k, v, first=1), (weights @ v)[:, :, 1:])
    assert not torch.allclose(weights.sum(-2), torch.full((2, 4, 10), 2.0))  # columns do not


def test_the_last_block_keeps_its_feed_forward():
    """SCLIP keeps the residual and the MLP of the last block (ClearCLIP drops them)."""
    model = tiny("sclip")
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    before = model.window_features(windows)
    with torch.no_grad():
        model.clip_model.visual.transformer.resblocks[-1].mlp[-1].weight.mul_(3.0)
    assert (model.window_features(windows) - before).abs().max() > 1e-3


def test_published_settings_per_dataset():
    """configs/cfg_*.py of wangf3014/SCLIP: thresholds, logit scales, VOC21's area filter, sizes."""
    voc21 = dataset_settings("sclip", PRESETS["voc21"])
    assert (voc21["bg_threshold"], voc21["logit_scale"], voc21["area_threshold"]) == (0.1, 65.0, 0.1)
    assert (voc21["window"], voc21["stride"], voc21["short_side"], voc21["pad_multiple"]) == (224, 112, 336, 1)
    assert dataset_settings("sclip", PRESETS["context60"])["logit_scale"] == 50.0
    assert dataset_settings("sclip", PRESETS["coco_object"])["bg_threshold"] == 0.1
    assert dataset_settings("sclip", PRESETS["voc20"])["bg_threshold"] == 0.0
    assert dataset_settings("sclip", PRESETS["cityscapes"])["short_side"] == 560
    assert dataset_settings("sclip", PRESETS["ade20k"])["short_side"] == 336
    assert dataset_settings("sclip", PRESETS["coco_stuff"])["short_side"] == 448
    assert dataset_settings("sclip", PRESETS["voc21"], protocol="dataset")["bg_threshold"] == 0.2  # ProxyCLIP's
    assert dataset_settings("sclip", PRESETS["voc21"])["refine"] is None  # pamr_steps=0 in the published code


@pytest.mark.parametrize("area", [0.0, 0.1, 0.3])
def test_classify_with_the_area_filter_matches_published(area):
    model = tiny("sclip", area_threshold=area, bg_threshold=0.2, logit_scale=65.0)
    torch.manual_seed(1)
    logits = torch.randn(7, 40, 50) * 0.05  # Q x H x W, 7 queries for 4 classes
    logits[3:6, :30] += 0.1  # class 2 wins most of the image
    labels, probs = model.classify(logits, CLASSES)
    expected_labels, expected_probs = sclip_published.postprocess_result(
        logits[None].clone(), [i for i, names in enumerate(CLASSES) for _ in names], 65.0, 0.2, area or None)
    assert torch.equal(labels, expected_labels)
    torch.testing.assert_close(probs, expected_probs)
    # bands of rows (classify_at_size) give what the whole image gives
    model.band_elements = 7 * 50 * 3  # three rows a band
    band_labels, band_probs = model.classify_at_size(logits, (40, 50), CLASSES, return_probs=True)
    assert np.array_equal(band_labels, expected_labels.numpy())
    np.testing.assert_allclose(band_probs, expected_probs.numpy(), atol=1e-6)


def test_the_area_filter_drops_small_classes():
    model = tiny("sclip", area_threshold=0.1)
    logits = torch.zeros(4, 20, 20)
    logits[1] = 1.0  # class 1 everywhere ...
    logits[2, :1, :10] = 2.0  # ... but for 10 pixels of class 2: 2.5% of the foreground
    labels, _ = model.classify(logits, ["background", "a", "b", "c"])
    assert (labels == 1).all()
    labels, _ = model.with_config(area_threshold=0.0).classify(logits, ["background", "a", "b", "c"])
    assert (labels == 2).sum() == 10


@pytest.mark.fullsize
def test_fullsize_vitb16_one_window_matches_published():
    model = fullsize_model("sclip")
    torch.manual_seed(0)
    window = torch.randn(1, 3, 336, 336)
    assert window_diff(model, sclip_published.forward_feature, window) < 1e-4
