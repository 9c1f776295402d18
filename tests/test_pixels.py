"""The published pixel normalisation: CLIP's input and the VFMs' input (proxyclip/model/pixels.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

from proxyclip.model import pixels
from proxyclip.model.catalog import VFM_TIMM_NAMES
from proxyclip.model.vfm import VFM_BUILDERS


def test_published_constants():
    """mc-lan/ProxyCLIP proxyclip_segmentor.py: SegDataPreProcessor, UnNormalize, transforms.Normalize."""
    assert pixels.PUBLISHED_CLIP_MEAN_255 == (122.771, 116.746, 104.094)
    assert pixels.PUBLISHED_CLIP_STD_255 == (68.501, 66.632, 70.323)
    assert pixels.OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert pixels.OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert pixels.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert pixels.IMAGENET_STD == (0.229, 0.224, 0.225)


def test_clip_input_constants():
    import open_clip

    assert pixels.clip_input_constants(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD) == (
        pixels.PUBLISHED_CLIP_MEAN_255, pixels.PUBLISHED_CLIP_STD_255)
    mean, std = pixels.clip_input_constants((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # another CLIP: its own x 255
    assert mean == (127.5,) * 3 and std == (127.5,) * 3


def test_preprocess_uses_the_published_constants():
    """(pixels - mmseg mean) / mmseg std in float32, not open_clip's (pixels / 255 - mean) / std
    (they differ by up to ~1.4e-5)."""
    model = tiny_model()
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = model.preprocess(image)  # 3 x 30 x 40 (no resize in tiny models)
    x = torch.from_numpy(image).permute(2, 0, 1).float()
    expected = (x - torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)) / torch.tensor(
        [68.501, 66.632, 70.323]).view(3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    open_clip_way = (x / 255 - torch.tensor(pixels.OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(
        pixels.OPENAI_CLIP_STD).view(3, 1, 1)
    assert (open_clip_way - out).abs().max() > 5e-6  # the deviation this replaced


def test_vfm_input_is_published_unnorm_then_norm():
    """The VFM sees norm(unnorm(x)): CLIP's exact 0-1 constants back, ImageNet's forward, as published
    (including the zero padding of small windows, which un-normalises to CLIP's mean)."""
    model = tiny_model()
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 16, 24)
    windows[..., :4] = 0.0  # padding
    out = model.to_vfm_input(windows)
    expected = []
    for img in windows:
        img = img.clone()
        for t, m, s in zip(img, pixels.OPENAI_CLIP_MEAN, pixels.OPENAI_CLIP_STD):
            t.mul_(s).add_(m)
        mean = torch.tensor(pixels.IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(pixels.IMAGENET_STD).view(3, 1, 1)
        expected.append(img.sub_(mean).div_(std))
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)


def test_pure_functions_shapes_and_dtypes():
    x = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    y = pixels.normalise_clip_input(x, pixels.PUBLISHED_CLIP_MEAN_255, pixels.PUBLISHED_CLIP_STD_255)
    assert y.shape == (3, 5, 7) and y.dtype == torch.float32
    z = pixels.clip_to_vfm_input(y[None].bfloat16(), pixels.OPENAI_CLIP_MEAN, pixels.OPENAI_CLIP_STD,
                                 pixels.IMAGENET_MEAN, pixels.IMAGENET_STD)
    assert z.shape == (1, 3, 5, 7) and z.dtype == torch.bfloat16


@pytest.mark.parametrize("key", sorted(VFM_TIMM_NAMES))
def test_every_vfm_is_normalised_as_published(key):
    """The published code normalises every VFM's input with ImageNet's constants, SAM and MAE included
    (Stable Diffusion, not in the published code, takes its own [-1, 1] pixels: tests/test_sd.py)."""
    kwargs = {"img_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2}
    if key == "sam_vitb":
        kwargs.update(global_attn_indexes=[0], neck_chans=16)
    vfm = VFM_BUILDERS[key](random_weights=True, **kwargs)
    assert tuple(vfm.mean) == pixels.IMAGENET_MEAN and tuple(vfm.std) == pixels.IMAGENET_STD
