"""GEM equals its published code (oracle: tests/oracles/gem_published.py), and what makes it GEM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from oracles import gem_published as ref

from proxyclip import ProxyCLIPConfig
from proxyclip.errors import ProxyCLIPError
from proxyclip.evaluation.presets import PRESETS
from proxyclip.evaluation.runner import dataset_settings
from proxyclip.model.methods import METHODS
from proxyclip.model.selfself import self_self_attention

CLASSES = [["cat", "kitten"], ["dog"], ["grass"], ["sky"]]

# GEM's options -> the published keyword arguments (the tiny CLIP has 2 blocks: depth 3 puts both on the path)
OPTION_SETS = {
    "two-blocks": ({"gem_depth": 3}, {"depth": 3}),
    "last-block": ({"gem_depth": 2}, {"depth": 2}),
    "no-iteration": ({"gem_depth": 3, "gem_iterations": 0}, {"depth": 3, "ss_attn_iter": 0}),
    "fixed-temperature": ({"gem_depth": 3, "gem_iterations": 3, "gem_temp": 2.0},
                          {"depth": 3, "ss_attn_iter": 3, "ss_attn_temp": 2.0}),
    "clearclip-no-residual": ({"gem_depth": 3, "gem_residual": "drop"}, {"depth": 3, "ignore_residual": True}),
    "default-depth": ({}, {"depth": 3}),  # 7 on a 2-block CLIP: the path runs through all blocks
}


def _window_diff(options: dict, published: dict, sizes=((112, 112), (48, 48), (64, 112))) -> float:
    model = tiny_model(method="gem", **options)
    torch.manual_seed(0)
    text = F.normalize(torch.randn(5, model.clip.embed_dim), dim=-1)  # Q x E
    worst = 0.0
    for height, width in sizes:  # grid 7 x 7: the embedding upsampled; 3 x 3: downsampled (antialiased); 4 x 7
        windows = torch.randn(2, 3, height, width)
        ours = model.window_logits(windows, text)  # 3 x Q x H x W, the windows batched
        expected = torch.cat([ref.forward_feature(model.clip_model, w[None], text, **published) for w in windows])
        assert ours.shape == expected.shape
        worst = max(worst, float((ours - expected).abs().max()))
    return worst


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_window_logits_match_published(name):
    options, published = OPTION_SETS[name]
    assert _window_diff(options, published) < 1e-5


@pytest.mark.parametrize("size", [(80, 100), (150, 223), (20, 30)])
def test_image_logits_match_published_slide(size):
    """The whole image under ClearCLIP's protocol (windows padded to the patch size, 16)."""
    model = tiny_model(method="gem", gem_depth=3)
    assert model.config.pad_multiple == 16 and model.config.logit_scale == 50.0
    torch.manual_seed(0)
    image = torch.randn(3, *size)
    text = model.encode_classes(CLASSES)
    out = (size[0] + 5, size[1] - 3)
    ours = model.predict_logits(image, text, out_size=out)
    expected = ref.forward_slide(model.clip_model, image[None], text, out, stride=56, crop_size=112, depth=3)[0]
    assert float((ours - expected).abs().max()) < 1e-5


def test_settings_are_clearclips_protocol():
    spec = METHODS["gem"]
    assert spec.settings["logit_scale"] == 50.0 and spec.settings["window"] == 448
    voc21 = dataset_settings("gem", PRESETS["voc21"])
    assert voc21["bg_threshold"] == 0.5 and voc21["window"] == 448 and voc21["stride"] == 224
    assert voc21["short_side"] == 448 and voc21["pad_multiple"] == 16
    city = dataset_settings("gem", PRESETS["cityscapes"])
    assert (city["window"], city["stride"]) == (224, 224)
    assert dataset_settings("gem", PRESETS["coco_object"])["bg_threshold"] == 0.4
    assert dataset_settings("gem", PRESETS["voc21"], protocol="dataset")["bg_threshold"] == 0.2  # ProxyCLIP's
    with pytest.raises(ProxyCLIPError, match="gem_residual"):
        ProxyCLIPConfig.create(method="gem", gem_residual="maybe")
    with pytest.raises(ProxyCLIPError, match="gem_depth"):
        ProxyCLIPConfig.create(method="gem", gem_depth=1)


def test_self_self_path_is_permutation_equivariant_and_scale_free():
    """GEM's attention has no positions (permuting tokens permutes its output) and, its tokens
    being l2-normalised, ignores their scale; CLIPSurgery's v-v attention does not."""
    torch.manual_seed(0)
    x, v = torch.randn(2, 4, 30, 8), torch.randn(2, 4, 30, 8)  # B x H x L x d
    t = torch.rand(2, 1, 1, 1) + 0.5
    out = self_self_attention(x, v, t, iterations=2, normalize=True)
    perm = torch.randperm(30)
    torch.testing.assert_close(self_self_attention(x[:, :, perm], v[:, :, perm], t, 2, True), out[:, :, perm])
    torch.testing.assert_close(self_self_attention(3 * x, v, t, 2, True), out)
    assert not torch.allclose(self_self_attention(3 * x, v, 0.35), self_self_attention(x, v, 0.35), atol=1e-3)
    explicit = (F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).transpose(-1, -2) * t).softmax(-1) @ v
    torch.testing.assert_close(self_self_attention(x, v, t, 0, True), explicit)


def test_without_residual_only_the_last_block_counts():
    """ClearCLIP's reading (``ignore_residual``): the path keeps the last block's output only, so its
    depth does not matter; GEM's own (the residual kept) does depend on it."""
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    drop = [tiny_model(method="gem", gem_depth=d, gem_residual="drop").window_features(windows) for d in (2, 3)]
    torch.testing.assert_close(drop[0], drop[1])
    keep = [tiny_model(method="gem", gem_depth=d).window_features(windows) for d in (2, 3)]
    assert not torch.allclose(keep[0], keep[1], atol=1e-3)


@pytest.mark.fullsize
def test_fullsize_vitb16_window_matches_published():
    """CLIP ViT-B/16 (OpenAI architecture, QuickGELU) with random weights, one 448-px window."""
    from proxyclip import ProxyCLIP

    model = ProxyCLIP.build(ProxyCLIPConfig.create(method="gem"), random_weights=True)
    torch.manual_seed(0)
    window = torch.randn(1, 3, 448, 448)
    text = F.normalize(torch.randn(10, model.clip.embed_dim), dim=-1)
    ours = model.window_logits(window, text)
    expected = ref.forward_feature(model.clip_model, window, text)
    assert float((ours - expected).abs().max()) < 1e-4
