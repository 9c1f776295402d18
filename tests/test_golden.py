"""Golden probabilities: tiny random weights in the ORIGINAL formats (tests/data/golden), a small image,
and the probabilities the oracle computed once from them. Any change to the pixel path (decoding,
resize, normalisation), to checkpoint loading or to a VFM's forward pass shows up here.
(Written by ``python tests/make_golden.py``.)"""

from __future__ import annotations

import json

import make_golden
import numpy as np
import open_clip
import originals
import pytest

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.model.clip import load_clip

GOLDEN = make_golden.GOLDEN
SETTINGS = json.loads((GOLDEN / "settings.json").read_text())
EXPECTED = np.load(GOLDEN / "expected.npz")


def _model(kind: str) -> ProxyCLIP:
    """proxyclip with the golden files, loaded as users load theirs (clip weights=..., VFM builders)."""
    clip_model, tokenizer = load_clip(originals.GOLDEN_CLIP, None, weights=str(GOLDEN / "clip.safetensors"))
    vfm = originals.load_vfm(kind, GOLDEN / SETTINGS["files"][kind], **SETTINGS["timm_overrides"][kind])
    keys = ("window", "stride", "short_side", "long_side", "beta", "gamma", "logit_scale", "bg_threshold")
    config = ProxyCLIPConfig.create(clip=originals.GOLDEN_CLIP, clip_pretrained="", **{k: SETTINGS[k] for k in keys})
    return ProxyCLIP(clip_model, tokenizer, vfm, config)


@pytest.mark.parametrize("kind", ["dino", "dinov2", "sam", "mae"])
def test_segment_gives_the_golden_probabilities(kind: str) -> None:
    result = _model(kind).segment(GOLDEN / "image.png", SETTINGS["classes"], return_probs=True)
    expected = EXPECTED[f"{kind}_probs"]
    assert result.probs.shape == expected.shape == (3, 32, 45)
    assert np.abs(result.probs - expected).max() < 1e-5
    np.testing.assert_array_equal(result.labels, EXPECTED[f"{kind}_labels"])


@pytest.mark.parametrize("kind", ["dino", "sam"])
def test_golden_probabilities_are_the_oracles(kind: str) -> None:
    """The stored numbers are what the oracle computes from the files (as the original code reads them)."""
    labels, probs = make_golden.oracle_probs(kind)
    assert np.abs(probs - EXPECTED[f"{kind}_probs"]).max() < 1e-6
    np.testing.assert_array_equal(labels, EXPECTED[f"{kind}_labels"])


def test_golden_files_stay_small() -> None:
    assert originals.GOLDEN_CLIP in open_clip.list_models()
    assert sum(f.stat().st_size for f in GOLDEN.iterdir()) < 600_000
