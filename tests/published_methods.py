"""Helpers of the tests that compare a method with the transcription of its published code."""

from __future__ import annotations

import warnings

import torch
from conftest import tiny_model

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.model.clip import load_clip

CLASSES = [["cat", "kitten"], ["dog"], ["grass", "lawn", "meadow"], ["sky"]]

# (H, W) of the CLIP-normalised image; tiny models use window 112, stride 56 and 16-px patches.
SIZES = {
    "smaller-than-window": (80, 100),  # one window smaller than 112: run as it is, or padded (ClearCLIP)
    "non-square": (50, 200),  # 50 x 112 windows
    "tiny": (20, 30),  # a one-patch grid (ClearCLIP: padded to 32 x 32)
    "one-window": (112, 112),
    "several-windows": (150, 223),  # not multiples of 16; windows shifted back at the borders
    "many-windows": (300, 170),
}
OUT_SIZE_DELTA = (7, -3)  # logits resized to a size other than the image's, as for the original size


def max_diff(model: ProxyCLIP, oracle, size: tuple[int, int], seed: int = 0, **oracle_kwargs) -> float:
    """Max abs difference of ``model.predict_logits`` and ``oracle(model, image, text, out_size)``."""
    torch.manual_seed(seed)
    image = torch.randn(3, *size)  # 3 x H x W, CLIP-normalised
    text = model.encode_classes(CLASSES)  # Q x E
    out = (size[0] + OUT_SIZE_DELTA[0], size[1] + OUT_SIZE_DELTA[1])
    ours = model.predict_logits(image, text, out_size=out)  # Q x H0 x W0
    with torch.no_grad():
        expected = oracle(model, image, text, out, **oracle_kwargs)  # Q x H0 x W0
    assert ours.shape == expected.shape == (text.shape[0], *out)
    assert torch.isfinite(expected).all()
    return float((ours - expected).abs().max())


def window_diff(model: ProxyCLIP, feature, window: torch.Tensor, **kwargs) -> float:
    """Max abs difference of ``model.window_logits`` and the published ``forward_feature`` on one window."""
    text = model.encode_classes(CLASSES)
    with torch.no_grad():
        ours = model.window_logits(window, text)  # 1 x Q x h x w
        expected = feature(model.clip_model, window, text, **kwargs)  # 1 x Q x h x w
    assert ours.shape == expected.shape
    return float((ours - expected).abs().max())


def fullsize_model(method: str, **settings) -> ProxyCLIP:
    """CLIP ViT-B/16 (OpenAI architecture, QuickGELU) with random weights, fp32, CPU."""
    config = ProxyCLIPConfig.create(method=method, **settings)
    clip_model, tokenizer = load_clip(config.clip, config.clip_pretrained, random_weights=True)
    return ProxyCLIP(clip_model, tokenizer, None, config)


def tiny(method: str, **settings) -> ProxyCLIP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(method=method, **settings)
