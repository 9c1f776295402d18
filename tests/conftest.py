"""Tiny random-weight models of the real architectures, built in well under a second."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network in tests; before the imports below
os.environ.setdefault("PROXYCLIP_CACHE", "off")  # no text embeddings from earlier runs (tests of the cache set a folder)

import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.model.vfm import TimmViT

TINY_CLIP = "proxyclip-test-tiny"
open_clip.add_model_config(Path(__file__).parent / "configs" / f"{TINY_CLIP}.json")


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(TINY_CLIP, pretrained=None)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(TINY_CLIP)


def tiny_dino(seed: int = 1, patch: int = 8) -> TimmViT:
    torch.manual_seed(seed)
    model = timm.create_model(
        f"vit_small_patch{patch}_224.dino", pretrained=False, embed_dim=32, depth=2, num_heads=2,
        dynamic_img_size=True, num_classes=0,
    )
    return TimmViT(model.eval().requires_grad_(False), pos_recipe="dino")


def tiny_model(vfm=None, **config) -> ProxyCLIP:
    """A ProxyCLIP of tiny random models; ``config`` overrides ProxyCLIPConfig fields."""
    config.setdefault("window", 112)
    config.setdefault("stride", 56)
    config.setdefault("short_side", None)
    config = ProxyCLIPConfig.create(clip=TINY_CLIP, clip_pretrained="", **config)
    clip_model, tokenizer = tiny_clip()
    if vfm is None and config.needs_vfm:
        vfm = tiny_dino()
    return ProxyCLIP(clip_model, tokenizer, vfm, config)


@pytest.fixture
def model() -> ProxyCLIP:
    return tiny_model()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
