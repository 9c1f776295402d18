"""NACLIP: equal to its published code (oracle: tests/oracles/naclip_published.py), and its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import naclip_published
from published_methods import SIZES, fullsize_model, max_diff, tiny, window_diff

from proxyclip.apps.cli import make_parser
from proxyclip.apps.options import config_from_args
from proxyclip.errors import ProxyCLIPError
from proxyclip.evaluation.presets import PRESETS
from proxyclip.evaluation.runner import dataset_settings
from proxyclip.model.methods.naclip import WHOLE_IMAGE, neighbourhood_attention_weights, neighbourhood_bias


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_logits_match_published(size):
    """With PAMR on, as NACLIP's published runs (at the output size, on the resized image)."""
    model = tiny("naclip")
    assert model.config.refine == "pamr"
    assert max_diff(model, naclip_published.predict_logits, size) < 1e-5


@pytest.mark.parametrize("std", [1.0, 2.5])
def test_logits_match_published_without_pamr_other_std(std):
    model = tiny("naclip", refine="none", gaussian_std=std)
    assert model.config.refine is None
    assert max_diff(model, naclip_published.predict_logits, SIZES["several-windows"]) < 1e-5


@pytest.mark.parametrize("size", [(150, 223), (64, 200)])
def test_whole_image_matches_published_slide_crop_0(size):
    """VOC's published configs run the whole image at once (slide_crop=0)."""
    model = tiny("naclip", window=WHOLE_IMAGE, stride=WHOLE_IMAGE)
    assert max_diff(model, naclip_published.predict_logits, size) < 1e-5


def test_neighbourhood_bias_is_the_published_addition():
    for grid in [(4, 4), (3, 7), (7, 3), (1, 5)]:
        window = naclip_published.gaussian_window(2 * grid[0] - 1, 2 * grid[1] - 1, std=5.0)
        expected = naclip_published.get_attention_addition(*grid, window)
        torch.testing.assert_close(neighbourhood_bias(grid, 5.0), expected, rtol=0, atol=1e-6)


def test_a_far_patch_contributes_less_than_with_plain_attention():
    torch.manual_seed(0)
    grid = (6, 6)
    k = torch.randn(1, 2, 1 + 36, 8)  # B x H x L x d
    plain = neighbourhood_attention_weights(k, torch.zeros(37, 37))  # plain k-k attention
    near = neighbourhood_attention_weights(k, neighbourhood_bias(grid, 1.5))
    query, far, neighbour = 1, 36, 2  # patch (0, 0), the opposite corner (5, 5), and (0, 1)
    assert (near[..., query, far] < plain[..., query, far]).all()
    assert (near[..., query, neighbour] / near[..., query, far] > plain[..., query, neighbour] / plain[..., query, far]).all()
    huge = neighbourhood_attention_weights(k, neighbourhood_bias(grid, 1e6))  # flat Gaussian: plain on the patches
    patches = plain[..., 1:, 1:] / plain[..., 1:, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(huge[..., 1:, 1:] / huge[..., 1:, 1:].sum(-1, keepdim=True), patches)


def test_keeps_no_residual_and_no_feed_forward():
    model = tiny("naclip")
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    before = model.window_features(windows)
    block = model.clip_model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        for p in (*block.mlp.parameters(), *block.ln_2.parameters()):
            p.normal_()
    torch.testing.assert_close(model.window_features(windows), before, rtol=0, atol=0)


def test_gaussian_std_must_be_positive():
    with pytest.raises(ProxyCLIPError, match="gaussian_std"):
        tiny("naclip", gaussian_std=0.0)


def test_published_settings_per_dataset():
    """configs/cfg_*.py of sinahmr/NACLIP, and naclip.py's defaults (PAMR on)."""
    voc21 = dataset_settings("naclip", PRESETS["voc21"])
    assert (voc21["bg_threshold"], voc21["logit_scale"], voc21["refine"]) == (0.1, 40.0, "pamr")
    assert (voc21["window"], voc21["short_side"], voc21["pad_multiple"]) == (WHOLE_IMAGE, 336, 1)
    assert dataset_settings("naclip", PRESETS["voc20"])["window"] == WHOLE_IMAGE
    context60 = dataset_settings("naclip", PRESETS["context60"])
    assert (context60["bg_threshold"], context60["window"], context60["stride"]) == (0.1, 224, 112)
    assert dataset_settings("naclip", PRESETS["coco_object"])["bg_threshold"] == 0.1
    assert dataset_settings("naclip", PRESETS["cityscapes"])["short_side"] == 560
    assert dataset_settings("naclip", PRESETS["ade20k"])["short_side"] == 336
    assert dataset_settings("naclip", PRESETS["voc21"], {"refine": "none"})["refine"] == "none"  # off on request


def test_segment_refines_at_the_original_size():
    """PAMR runs on the logits at the image's own size, as published (not at the resized one)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    model = tiny("naclip", short_side=64)
    text = model.encode_classes(["cat", "dog", "sky"])
    seg = model.segment(pixels, ["cat", "dog", "sky"], return_probs=True)
    logits = naclip_published.predict_logits(model, model.preprocess(pixels), text, (90, 130))
    expected = (logits * model.config.logit_scale).softmax(0)
    np.testing.assert_allclose(seg.probs, expected.numpy(), atol=1e-5)
    # the command line turns it off with --refine none
    args = make_parser().parse_args(["segment", "a.png", "--classes", "a, b", "--method", "naclip"])
    assert config_from_args(args).refine == "pamr"
    args = make_parser().parse_args(["segment", "a.png", "--classes", "a, b", "--method", "naclip", "--refine", "none"])
    assert config_from_args(args).refine is None


@pytest.mark.fullsize
def test_fullsize_vitb16_one_window_matches_published():
    model = fullsize_model("naclip")
    torch.manual_seed(0)
    window = torch.randn(1, 3, 336, 336)
    assert window_diff(model, naclip_published.forward_feature, window) < 1e-4
