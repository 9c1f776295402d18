"""The method registry: a method is one small plug-in that every part of the tool discovers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, tiny_clip, tiny_dino, tiny_model

from proxyclip import ProxyCLIPConfig
from proxyclip.apps.cli import main, make_parser
from proxyclip.errors import ProxyCLIPError
from proxyclip.model.clip import ClipAdapter
from proxyclip.model.methods import METHODS, MethodSpec, Windows, register_method

# ---- a toy method, written as a user would: one spec, one builder --------------------------------

@dataclass(frozen=True)
class ToyOptions:
    toy_scale: float = field(default=2.0, metadata={"help": "how much the toy scales its values"})


def build_toy(options: ToyOptions):
    def toy(windows: Windows) -> torch.Tensor:
        clip = windows.clip
        x = clip.last_block_input(windows.pixels)  # N x (1 + hw) x D
        block = clip.block(-1)
        _, _, v = block.qkv(block.ln_1(x[:, 1:]))  # N x hw x D
        z = clip.project(block.out_proj(v * options.toy_scale))  # N x hw x E
        return clip.to_map(z, clip.grid(windows.pixels))  # N x E x h x w

    return toy


@pytest.fixture
def toy(monkeypatch):
    """Register the toy method for one test (the registry is global: monkeypatch restores it)."""
    monkeypatch.setitem(METHODS, "toy", MethodSpec(
        name="toy", title="ToyCLIP", summary="a test method scaling the last values", build=build_toy,
        options=ToyOptions, settings={"logit_scale": 50.0}))
    return METHODS["toy"]


def test_toy_method_appears_in_segment_eval_and_bench_help(toy, capsys):
    for command in ("segment", "eval", "bench"):
        with pytest.raises(SystemExit):
            make_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "toy" in text, command
    with pytest.raises(SystemExit):
        make_parser().parse_args(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a test method scaling the last values" in text
    assert "--toy-scale" in text and "how much the toy scales its values (default: toy 2.0)" in text


def test_toy_method_runs_through_segment_and_eval(toy, tmp_path):
    from PIL import Image
    from test_datasets import make_dataset

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    tiny = ["--clip", TINY_CLIP, "--clip-pretrained", "", "--random-weights", "--device", "cpu"]
    assert main(["segment", str(tmp_path / "a.png"), "--classes", "sky, dog", "--out", str(tmp_path / "o"),
                 "--method", "toy", "--toy-scale", "3", "--window", "112", "--stride", "56", "--short-side", "0",
                 *tiny]) == 0
    assert (tmp_path / "o" / "a.png").exists()
    from proxyclip.evaluation.presets import PRESETS

    root = make_dataset(PRESETS["voc21"], tmp_path / "voc", n=2)
    out = tmp_path / "eval"
    assert main(["eval", "--dataset", "voc21", "--root", str(root), "--out", str(out), "--method", "toy",
                 "--window", "112", "--stride", "56", "--short-side", "64", "--workers", "0", "--no-progress",
                 *tiny]) == 0
    result = json.loads(next(out.glob("voc21-*.json")).read_text())
    assert result["method"] == "toy" and result["config"]["toy_scale"] == 2.0
    assert result["config"]["logit_scale"] == 50.0  # the method's own setting
    assert "ToyCLIP" in result["config_label"]


def test_toy_method_in_the_demo_and_bench(toy):
    from proxyclip.apps import demo
    from proxyclip.apps.bench import default_rows, parse_row

    assert demo.method_titles()["toy"] == "ToyCLIP"
    assert demo.method_options()["toy_scale"]["methods"] == ["toy"]
    assert "toy" in default_rows("dino_vitb8") and parse_row("toy", "dino_vitb8").method == "toy"
    with pytest.raises(ProxyCLIPError, match="uses no VFM"):
        parse_row("toy:dino_vitb8", "dino_vitb8")


def test_toy_method_in_python(toy):
    model = tiny_model(method="toy", vfm=tiny_dino())
    assert model.config.options == ToyOptions() and model.config.logit_scale == 50.0
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    a = model.with_config(toy_scale=1.0).window_features(windows)
    b = tiny_model(method="maskclip").window_features(windows)
    torch.testing.assert_close(a, b)  # the toy at scale 1 is MaskCLIP (features are normalised)
    back = model.with_config(method="proxyclip")
    assert back.config.logit_scale == 40.0  # still at the toy's default: takes the new method's
    assert model.with_config(logit_scale=30.0).with_config(method="maskclip").config.logit_scale == 30.0  # chosen: kept


def test_register_method_is_the_only_step(monkeypatch):
    spec = MethodSpec(name="toy2", title="Toy2", summary="s", build=build_toy, options=ToyOptions)
    monkeypatch.setitem(METHODS, "placeholder", spec)  # let monkeypatch restore the registry afterwards
    del METHODS["placeholder"]
    assert register_method(spec) is spec and METHODS["toy2"] is spec
    assert ProxyCLIPConfig.create(method="toy2", toy_scale=5.0).options.toy_scale == 5.0
    del METHODS["toy2"]


# ---- configuration --------------------------------------------------------------------------------

def test_config_picks_the_papers_pretrained_tag():
    assert ProxyCLIPConfig(clip="ViT-H-14").clip_pretrained == "laion2b_s32b_b79k"
    assert ProxyCLIPConfig(clip="ViT-B-16").clip_pretrained == "openai"
    assert ProxyCLIPConfig(clip="ViT-H-14", clip_pretrained="other").clip_pretrained == "other"


def test_config_routes_method_options_and_refuses_strays():
    cfg = ProxyCLIPConfig.create(beta=1.5, window=224)
    assert cfg.options.beta == 1.5 and cfg.window == 224 and cfg.options.gamma == 3.0
    with pytest.raises(ProxyCLIPError, match="unknown setting"):
        ProxyCLIPConfig.create(method="maskclip", beta=1.5)
    with pytest.raises(ProxyCLIPError, match="takes options of type"):
        ProxyCLIPConfig(method="maskclip", options=ProxyCLIPConfig().options)
    with pytest.raises(ProxyCLIPError, match="attention"):
        ProxyCLIPConfig.create(attention="nope")
    assert cfg.weights() == {"clip": "ViT-B-16", "clip_pretrained": "openai", "vfm": "dino_vitb8"}
    assert cfg.updated(method="clip").weights()["vfm"] is None  # the VFM identifies no weight of a method without one


def test_cli_refuses_an_option_of_another_method(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    rc = main(["segment", str(tmp_path / "a.png"), "--classes", "a, b", "--method", "maskclip", "--beta", "1.0",
               "--clip", TINY_CLIP, "--clip-pretrained", "", "--random-weights"])
    assert rc == 2 and "--beta does not apply to method 'maskclip'" in capsys.readouterr().err


# ---- the model as a torch module ---------------------------------------------------------------------

def test_to_after_encoding_keeps_working(rng):
    model = tiny_model()
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    fp32 = model.segment(image, ["a", "b"], return_probs=True)
    model.to(torch.float64)
    assert model.dtype == torch.float64
    fp64 = model.segment(image, ["a", "b"], return_probs=True)  # the cached text follows the dtype
    np.testing.assert_allclose(fp64.probs, fp32.probs, atol=1e-4)
    model.bfloat16()
    assert np.isfinite(model.segment(image, ["a", "b"], return_probs=True).probs).all()
    assert all(e.dtype == torch.float32 and e.device.type == "cpu" for e in model._text_cache.values())


def test_segment_batch_equals_one_at_a_time(rng):
    model = tiny_model()
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((60, 80, 3), (112, 50, 3), (30, 30, 3))]
    batch = model.segment_batch(images, ["a", "b; c", "d"], return_probs=True)
    for image, result in zip(images, batch):
        alone = model.segment(image, ["a", "b; c", "d"], return_probs=True)
        np.testing.assert_array_equal(result.labels, alone.labels)
        np.testing.assert_allclose(result.probs, alone.probs, atol=1e-6)
    assert batch[0].probs is not None and model.segment_batch(images[:1], ["a", "b"])[0].probs is None


@pytest.mark.parametrize("bad", [np.full((8, 8, 3), 2.0, np.float32), np.full((8, 8, 3), -0.5, np.float64),
                                 np.full((8, 8, 3), np.nan, np.float32), np.zeros((8, 8, 3), np.int32)])
def test_non_uint8_images_are_refused_not_cast(bad):
    with pytest.raises(ProxyCLIPError, match="image array"):
        tiny_model().segment(bad, ["a", "b"])


def test_float_images_in_unit_range_are_handled(rng):
    model = tiny_model()
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    a = model.segment(image, ["a", "b"], return_probs=True).probs
    b = model.segment(image.astype(np.float32) / 255, ["a", "b"], return_probs=True).probs
    np.testing.assert_array_equal(a, b)


# ---- the CLIP adapter ----------------------------------------------------------------------------------

def test_adapter_pieces_rebuild_clips_own_forward():
    model, _ = tiny_clip()
    clip = ClipAdapter(model)
    torch.manual_seed(0)
    side = clip.visual.image_size[0]
    images = torch.randn(2, 3, side, side)  # the model's native size: no positional resizing
    x = clip.blocks(clip.embed(images))  # 2 x (1 + hw) x D, every block unchanged
    pooled = clip.project(x[:, :1])[:, 0]  # class token
    torch.testing.assert_close(pooled, model.encode_image(images), atol=1e-5, rtol=1e-5)
    block = clip.block(-1)
    y = clip.last_block_input(images)
    by_hand = y + block.ls_1(block.out_proj(block.attention(block.ln_1(y))))
    by_hand = by_hand + block.ls_2(block.mlp(block.ln_2(by_hand)))
    torch.testing.assert_close(by_hand, block.forward(y), atol=1e-5, rtol=1e-5)


def test_adapter_sizes():
    clip = ClipAdapter(tiny_clip()[0])
    assert clip.patch_size == 16 and clip.depth == len(clip.visual.transformer.resblocks)
    assert clip.width == clip.block(0).module.attn.embed_dim and clip.embed_dim == clip.visual.proj.shape[1]
    q, k, v = clip.block(0).qkv(torch.randn(1, 5, clip.width))
    assert q.shape == k.shape == v.shape == (1, 5, clip.width)
    assert clip.to_map(torch.randn(2, 6, 7), (2, 3)).shape == (2, 7, 2, 3)
    assert torch.equal(clip.to_map(torch.arange(6.0).view(1, 6, 1), (2, 3))[0, 0], torch.arange(6.0).view(2, 3))


def test_every_method_gives_unit_features_on_its_grid():
    torch.manual_seed(0)
    windows = torch.randn(2, 3, 112, 112)
    for name in METHODS:
        feats = tiny_model(method=name).window_features(windows)
        assert feats.dim() == 4 and feats.shape[0] == 2, name
        torch.testing.assert_close(feats.norm(dim=1), torch.ones_like(feats[:, 0]), msg=name)
        assert not F.normalize(feats, dim=1).isnan().any(), name


# ---- half precision as published ------------------------------------------------------------------------

def test_fp16_follows_the_published_mixed_precision():
    from proxyclip import ProxyCLIP

    config = ProxyCLIPConfig.create(clip=TINY_CLIP, clip_pretrained="", vfm="dino_vits16", window=112, stride=56,
                                    short_side=None)
    with pytest.warns(UserWarning, match="RANDOM"):
        model = ProxyCLIP.build(config, random_weights=True, dtype=torch.float16)
    visual = model.clip_model.visual
    # open_clip's precision="fp16": linear/conv/attention weights and proj in fp16; norms and embeddings fp32
    assert visual.conv1.weight.dtype == visual.proj.dtype == visual.transformer.resblocks[0].attn.in_proj_weight.dtype
    assert visual.proj.dtype == torch.float16 and model.dtype == torch.float16
    assert visual.ln_post.weight.dtype == visual.positional_embedding.dtype == visual.class_embedding.dtype == torch.float32
    assert type(visual.ln_post).__name__ == "LayerNormFp32"
    assert all(p.dtype == torch.float16 for p in model.vfm.parameters())  # the VFM: .half(), as published


def test_vfm_input_is_renormalised_in_fp32_then_cast(monkeypatch):
    model = tiny_model()
    seen = {}
    original = model.to_vfm_input

    def spy(pixels):
        seen["dtype"] = pixels.dtype
        return original(pixels)

    monkeypatch.setattr(model, "to_vfm_input", spy)
    model.to(torch.bfloat16).window_features(torch.randn(1, 3, 112, 112))
    assert seen["dtype"] == torch.float32
