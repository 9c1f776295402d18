"""End to end on the full-size architectures of the paper, with random weights (marker: fullsize)."""

import numpy as np
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image

from proxyclip.apps.cli import main
from proxyclip.model.clip import load_clip
from proxyclip.model.vfm import VFM_BUILDERS

pytestmark = pytest.mark.fullsize


def test_cli_vitb16_dino_vitb8(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "photo.jpg"), "--classes", "cat; kitten, dog, grass, sky",
                 "--random-weights", "--out", str(out), "--save-probs"])
    assert code == 0
    labels = np.asarray(Image.open(out / "photo.png"))
    assert labels.shape == (75, 100) and labels.max() < 4
    probs = np.load(out / "photo_probs.npy")
    assert probs.shape == (4, 75, 100) and np.isfinite(probs).all()


def test_openai_weights_get_quickgelu():
    from proxyclip.model.clip import _uses_quick_gelu

    model, _ = load_clip("ViT-B-16", "openai", random_weights=True)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not _uses_quick_gelu("ViT-H-14", "laion2b_s32b_b79k")


@pytest.mark.parametrize(
    "name,window,grid,channels",
    [
        ("dino_vitb8", 336, (42, 42), 768),
        ("dino_vits16", 280, (17, 17), 384),
        ("dinov2_vitb14_reg", 336, (24, 24), 768),
        ("mae_vitb16", 224, (14, 14), 768),
        ("sam_vitb", 336, (64, 64), 256),
    ],
)
def test_vfm_feature_grids(name, window, grid, channels):
    vfm = VFM_BUILDERS[name](random_weights=True)
    with torch.no_grad():
        feats = vfm(torch.randn(1, 3, window, window))
    assert feats.shape == (1, channels, *grid)
    assert torch.isfinite(feats).all()


def test_dino_positional_embedding_follows_the_published_recipe():
    """Tokens at 336 px use the DINO recipe, not timm's antialiased resize."""
    from proxyclip.model.pos_embed import resize_pos_embed_with_cls

    vfm = VFM_BUILDERS["dino_vitb16"](random_weights=True)
    with torch.no_grad():
        torch.nn.init.normal_(vfm.model.pos_embed, std=0.5)  # make positions matter
        x = torch.randn(1, 3, 336, 336)
        ours = vfm(x)
        timm_tokens = vfm.model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
    assert (ours - timm_tokens).abs().max() > 1e-3  # timm's own resize differs ...
    pos = resize_pos_embed_with_cls(vfm.model.pos_embed[0], (21, 21))
    manual = vfm.model.patch_embed(x).reshape(1, 441, -1)
    manual = torch.cat([vfm.model.cls_token, manual], 1) + pos
    with torch.no_grad():
        manual = vfm.model.norm(vfm.model.blocks(manual))[:, 1:]
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), manual)  # ... ours is the recipe
