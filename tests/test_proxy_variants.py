"""The proxy attention's variants of the paper's Table 7 (CLIP's own q and k in PAM, method
``proxyclip_clip``) and Table 4, lower half (the VFM's own last-layer attention, ProxyCLIP's
``attention="vfm_attn"``), checked against direct computations from their definitions."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_clip, tiny_dino, tiny_model
from oracles import proxyclip_published as ref

from proxyclip.errors import ProxyCLIPError
from proxyclip.model.attention import ATTENTION_VARIANTS, ablation_attention
from proxyclip.model.methods.proxyclip import last_block_values
from proxyclip.model.methods.proxyclip_clip import clip_proxy_attention, clip_proxy_similarity
from proxyclip.model.vfm import SamEncoder, TimmViT

# ---- Table 7: CLIP's q and k in PAM -------------------------------------------------------------------


def clip_qkv_maps(visual: torch.nn.Module, img: torch.Tensor) -> list[torch.Tensor]:
    """CLIP's last-block q, k, v of the patches as B x D x h x w maps, computed from open_clip's
    modules as the published code reads DINO's (a hook on qkv; heads concatenated; class token
    dropped), with the published positional-embedding recipe (the oracle's)."""
    p = int(visual.conv1.kernel_size[0])
    rows, cols = img.shape[-2] // p, img.shape[-1] // p
    x = visual.conv1(img).flatten(2).transpose(1, 2)  # B x hw x D
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = visual.ln_pre(x + ref.clip_positional_embedding(visual, rows, cols))
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)  # batch first (open_clip >= 2.24)
    attn = visual.transformer.resblocks[-1].attn
    qkv = F.linear(visual.transformer.resblocks[-1].ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    return [t[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, rows, cols) for t in qkv.chunk(3, dim=-1)]


@pytest.mark.parametrize("similarity", ["q-q", "k-k"])
def test_clip_qq_kk_equal_published_pam_fed_with_clips_embeddings(similarity):
    """The published ``custom_attn`` with CLIP's own q (or k) map as its ``ex_feats`` (the
    commented-out ``ex_feats = q...`` lines of its DINO branch, on CLIP)."""
    model = tiny_model(method="proxyclip_clip", similarity=similarity)
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    ours = model.window_features(windows)  # 2 x E x 7 x 7, normalised
    visual = model.clip_model.visual
    for i, window in enumerate(windows):
        q, k, _ = clip_qkv_maps(visual, window[None])
        feats = ref.encode_image(visual, window[None], q if similarity == "q-q" else k)  # 1 x 49 x E
        expected = F.normalize(feats, dim=-1)[0].T.reshape(-1, 7, 7)
        assert float((ours[i] - expected).abs().max()) < 1e-5


def test_clip_qk_from_the_definition():
    """q-k: S = n(q) n(k)^T (queries against keys), eq. 6, mask, softmax, out_proj(A v), by hand."""
    model = tiny_model(method="proxyclip_clip", similarity="q-k", beta=1.0, gamma=2.0)
    torch.manual_seed(1)
    window = torch.randn(1, 3, 112, 112)
    visual = model.clip_model.visual
    q, k, v = (t.flatten(2).transpose(1, 2)[0] for t in clip_qkv_maps(visual, window))  # 49 x D each
    s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
    a = 2.0 * (s - 1.0 * s.mean())
    attn = a.masked_fill(a < 0, float("-inf")).softmax(dim=-1)
    z = visual.ln_post(visual.transformer.resblocks[-1].attn.out_proj(attn @ v)) @ visual.proj  # 49 x E
    expected = F.normalize(z, dim=-1).T.reshape(-1, 7, 7)
    assert float((model.window_features(window)[0] - expected).abs().max()) < 1e-5


def test_qq_and_kk_similarities_are_symmetric_before_the_softmax_and_qk_is_not():
    torch.manual_seed(0)
    q, k = torch.randn(2, 30, 16), torch.randn(2, 30, 16)  # N x L x D
    for similarity in ("q-q", "k-k"):
        a = clip_proxy_similarity(q, k, similarity, 1.2, 3.0)
        torch.testing.assert_close(a, a.transpose(1, 2))
        assert (torch.diagonal(a, dim1=1, dim2=2) >= a.amax(dim=-1) - 1e-5).all()  # a token is most like itself
    a = clip_proxy_similarity(q, k, "q-k", 1.2, 3.0)
    assert not torch.allclose(a, a.transpose(1, 2), atol=1e-3)
    attn = clip_proxy_attention(q, k, "q-k", 1.2, 3.0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 30))
    assert (attn[a < 0] == 0).all()  # eq. 7's mask
    with pytest.raises(ProxyCLIPError, match="similarity"):
        tiny_model(method="proxyclip_clip", similarity="v-v")


def test_clip_qq_needs_no_vfm():
    model = tiny_model(method="proxyclip_clip")
    assert model.vfm is None and model.config.options.similarity == "q-q"  # the paper's q-q row by default


# ---- Table 4, lower half: the VFM's own last-layer attention -------------------------------------------


def _capture_last_attention_io(vfm: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of the last block's attention module during the VFM's own forward."""
    seen = {}
    block = vfm.model.blocks[-1]
    handle = block.attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    try:
        vfm(images)
    finally:
        handle.remove()
    return seen["x"], seen["out"]


def _tiny_timm(name: str, heads: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, embed_dim=32, depth=2, num_heads=heads, dynamic_img_size=True,
                             num_classes=0).eval().requires_grad_(False)


@pytest.mark.parametrize(("name", "recipe"), [("vit_small_patch8_224.dino", "dino"),
                                              ("vit_small_patch14_reg4_dinov2", None)])
def test_timm_vfm_attention_is_the_blocks_own(name, recipe):
    """With one head, ``A @ v`` through the block's projection is exactly what the block's attention
    returned in the VFM's own forward (class and register tokens kept); without them, each row is
    that row's patch part renormalised. With two heads the rows still sum to one."""
    vfm = TimmViT(_tiny_timm(name, heads=1), pos_recipe=recipe)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 56, 70)  # 7 x 8 DINO patches, 4 x 5 DINOv2 patches
    x, out = _capture_last_attention_io(vfm, images)
    attn = vfm.last_attention(images, prefix=True)  # B x N x N
    module = vfm.model.blocks[-1].attn
    v = module.qkv(x).chunk(3, dim=-1)[2]  # B x N x C (one head)
    torch.testing.assert_close(module.proj(attn @ v), out, atol=1e-5, rtol=1e-5)
    prefix = vfm.model.num_prefix_tokens
    patches = attn[:, prefix:, prefix:]
    expected = patches / patches.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(vfm.last_attention(images), expected, atol=1e-6, rtol=1e-5)
    grid = vfm.grid(images)
    assert vfm.last_attention(images).shape == (2, grid[0] * grid[1], grid[0] * grid[1])
    two_heads = TimmViT(_tiny_timm(name, heads=2), pos_recipe=recipe).last_attention(images)
    torch.testing.assert_close(two_heads.sum(-1), torch.ones(two_heads.shape[:2]))


def test_sam_attention_is_the_blocks_own_with_relative_positions():
    torch.manual_seed(0)
    model = timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, embed_dim=32, depth=2,
                              num_heads=1, window_size=2, global_attn_indexes=(1,), neck_chans=16, num_classes=0)
    model = model.eval().requires_grad_(False)
    for block in model.blocks:
        block.attn.rel_pos_h.normal_()  # zero at initialisation: make the relative positions count
        block.attn.rel_pos_w.normal_()
    vfm = SamEncoder(model)  # its input size from the model: 64
    images = torch.randn(2, 3, 40, 50)  # resized to 64 x 64: a 4 x 4 grid
    x, out = _capture_last_attention_io(vfm, images)  # B x 4 x 4 x C each
    attn = vfm.last_attention(images)  # B x 16 x 16
    module = model.blocks[-1].attn
    v = module.qkv(x.flatten(1, 2)).chunk(3, dim=-1)[2]  # B x 16 x C
    torch.testing.assert_close(module.proj(attn @ v), out.flatten(1, 2), atol=1e-5, rtol=1e-5)
    assert vfm.grid(images) == (4, 4)
    model.blocks[-1].window_size = 2
    with pytest.raises(ValueError, match="windows"):
        vfm.last_attention(images)


def test_vfm_attn_variant_pools_clips_values_with_the_vfms_attention():
    vfm = tiny_dino()
    model = tiny_model(vfm=vfm, attention="vfm_attn")
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    ours = model.window_features(windows)  # 2 x E x 14 x 14 (DINO's 8-px grid)
    attn = vfm.last_attention(model.to_vfm_input(windows))  # 2 x 196 x 196
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 196))
    from proxyclip.model.methods.base import Windows

    batch = Windows(source=windows, clip=model.clip)
    v = F.interpolate(last_block_values(batch), size=(14, 14), mode="bilinear", align_corners=False)  # 2 x D x 14 x 14
    z = model.clip.project(model.clip.block(-1).out_proj(attn @ v.flatten(2).transpose(1, 2)))  # 2 x 196 x E
    torch.testing.assert_close(ours, F.normalize(z, dim=-1).transpose(1, 2).reshape(2, -1, 14, 14), atol=1e-5, rtol=1e-5)
    assert "vfm_attn" in ATTENTION_VARIANTS
    with pytest.raises(ValueError, match="last_attention"):
        ablation_attention(torch.randn(1, 8, 4, 4), "vfm_attn")


def test_vfm_attn_differs_from_the_proxy_attention():
    torch.manual_seed(0)
    windows = torch.randn(1, 3, 112, 112)
    vfm = tiny_dino()
    proxy = tiny_model(vfm=vfm).window_features(windows)
    own = tiny_model(vfm=vfm, attention="vfm_attn").window_features(windows)
    assert proxy.shape == own.shape and not torch.allclose(proxy, own, atol=1e-3)


@pytest.mark.fullsize
@pytest.mark.parametrize(("name", "grid"), [("dino_vitb8", 42), ("dinov2_vitb14_reg", 24), ("sam_vitb", 64)])
def test_fullsize_vfm_last_attention(name, grid):
    """Table 4's VFMs: one L x L attention per window on the VFM's grid; SAM-B's last block is global."""
    from proxyclip.model.vfm import VFM_BUILDERS

    vfm = VFM_BUILDERS[name](random_weights=True)
    if name == "sam_vitb":
        assert vfm.model.blocks[-1].window_size == 0 and vfm.model.blocks[-2].window_size > 0
    with torch.no_grad():
        attn = vfm.last_attention(torch.randn(1, 3, 336, 336))
    assert attn.shape == (1, grid * grid, grid * grid)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, grid * grid))


def test_tiny_clip_is_what_the_oracle_expects():
    assert tiny_clip()[0].visual.transformer.batch_first  # clip_qkv_maps runs blocks batch first


@pytest.mark.parametrize("extra", [["--method", "gem", "--gem-depth", "3", "--gem-residual", "drop"],
                                   ["--method", "clipsurgery", "--feature-surgery", "off"],
                                   ["--method", "clipsurgery"],
                                   ["--method", "proxyclip_clip", "--similarity", "k-k", "--beta", "1.0"]])
def test_methods_run_through_the_command_line(extra, tmp_path):
    import numpy as np
    from conftest import TINY_CLIP
    from PIL import Image

    from proxyclip.apps.cli import main

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "--classes", "sky, dog, cat", "--out", str(tmp_path / "o"),
                 "--window", "112", "--stride", "56", "--short-side", "0", "--clip", TINY_CLIP, "--clip-pretrained", "",
                 "--random-weights", "--device", "cpu", *extra]) == 0
    labels = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    assert labels.shape == (40, 60) and labels.max() < 3
