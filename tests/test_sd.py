"""The Stable Diffusion VFM (sd15): the block of SD 1.5's UNet whose output is 22 x 22 x 1280 at a
336 window, tiny random configurations through the real code, loading and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from proxyclip.errors import ProxyCLIPError, WeightsError  # noqa: E402
from proxyclip.model import sd  # noqa: E402
from proxyclip.model.vfm import VFM_BUILDERS  # noqa: E402

TINY_UNET = dict(sd.SD15_UNET, block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=2)
TINY_VAE = dict(sd.SD15_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
TINY_TEXT = dict(sd.SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 projection_dim=32)


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return sd.build_random(TINY_UNET, TINY_VAE, TINY_TEXT)


def test_the_full_size_architecture_gives_22_x_22_x_1280_at_a_336_window():
    """SD 1.5's real UNet and VAE (on the meta device: shapes only, no weights, no compute)."""
    import diffusers

    with torch.device("meta"):
        unet, vae = diffusers.UNet2DConditionModel(**sd.SD15_UNET), diffusers.AutoencoderKL(**sd.SD15_VAE)
        features = sd.StableDiffusionFeatures(vae, unet, torch.empty(1, 77, 768))
        assert features.latents(torch.empty(1, 3, 672, 672)).shape == (1, 4, 84, 84)
        assert features(torch.empty(2, 3, 336, 336)).shape == (2, 1280, 22, 22)  # 336 -> 672 inside
        assert features(torch.empty(1, 3, 224, 224)).shape == (1, 1280, 14, 14)  # Cityscapes' 224 window


def test_tiny_features_and_the_empty_prompt(tiny_sd):
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.inference_mode():
        out = tiny_sd(x)
    assert out.shape == (2, 64, 4, 4)  # 112 px -> latent 14 -> 14, 7, 4, 2 -> up x 2 = 4
    with torch.inference_mode():
        one = tiny_sd(x[1:])
    torch.testing.assert_close(one, out[1:], atol=1e-4, rtol=1e-4)  # per window, batch-independent
    assert tiny_sd.prompt.shape == (1, 77, 32) and torch.isfinite(tiny_sd.prompt).all()
    assert sd.EMPTY_PROMPT_IDS[:2] == [49406, 49407] and len(sd.EMPTY_PROMPT_IDS) == 77


def test_proxyclip_with_the_sd_vfm_segments(tiny_sd, monkeypatch):
    assert VFM_BUILDERS["sd15"] is sd.build_sd15
    model = tiny_model(vfm=tiny_sd, window=56, stride=56)
    image = np.random.default_rng(0).integers(0, 256, (56, 100, 3), dtype=np.uint8)
    result = model.segment(image, ["cat", "dog", "sky"])
    assert result.labels.shape == (56, 100) and set(np.unique(result.labels)) <= {0, 1, 2}
    assert tuple(model.vfm.mean) == (0.5, 0.5, 0.5)  # SD's pixels in [-1, 1]


def test_weights_from_a_diffusers_folder(tiny_sd, tmp_path):
    import diffusers
    import transformers

    torch.manual_seed(3)
    vae, unet = diffusers.AutoencoderKL(**TINY_VAE), diffusers.UNet2DConditionModel(**TINY_UNET)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT))
    vae.save_pretrained(tmp_path / "vae")
    unet.save_pretrained(tmp_path / "unet")
    text.save_pretrained(tmp_path / "text_encoder")
    loaded = VFM_BUILDERS["sd15"](weights=str(tmp_path))
    direct = sd._from_parts(vae, unet, text)
    x = torch.rand(1, 3, 56, 56) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), direct(x))
    torch.testing.assert_close(loaded.prompt, direct.prompt)


def test_missing_weights_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        sd.build_sd15(weights=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "\n" not in message and "--vfm-weights" in message and "HF_HUB_OFFLINE=1" in message
    with pytest.raises(WeightsError, match="stable-diffusion-v1-5"):
        sd.build_sd15()  # not in this machine's cache, and offline
    ckpt = tmp_path / "sd.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(ProxyCLIPError, match="only .safetensors"):
        sd.build_sd15(weights=str(ckpt))


def test_without_diffusers_the_error_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ProxyCLIPError, match=r"pip install 'proxyclip\[sd\]'"):
        sd.build_sd15(random_weights=True)
