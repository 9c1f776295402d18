"""Fidelity: the fast path gives the published logits and labels (oracle: tests/oracles/proxyclip_published.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import open_clip
import originals
import pytest
import torch
from conftest import TINY_CLIP, tiny_dino, tiny_model
from oracles import proxyclip_published as ref
from torch import nn

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.model.clip import load_clip
from proxyclip.model.vfm import VFM_BUILDERS

CLASSES = [["cat", "kitten"], ["dog"], ["grass", "lawn", "meadow"], ["sky"]]

# (H, W) of the CLIP-normalised image; tiny models use window 112, stride 56, padding to 56.
SIZES = {
    "smaller-than-window": (80, 100),  # one window padded to 112 x 112
    "non-square-padded": (50, 200),  # 56 x 112 padded windows: the published code is wrong here
    "tiny": (20, 30),  # one window padded to 56 x 56 (CLIP grid 3 x 3 of 16-px patches)
    "one-window": (112, 112),
    "several-windows": (150, 223),  # not multiples of 56; windows shifted back at the borders
    "many-windows": (300, 170),
}
OUT_SIZE_DELTA = (7, -3)  # logits resized to a size other than the image's, as for the original size


def _max_diff(model: ProxyCLIP, size: tuple[int, int], seed: int = 0) -> float:
    torch.manual_seed(seed)
    image = torch.randn(3, *size)  # 3 x H x W, CLIP-normalised
    text = model.encode_classes(CLASSES)  # Q x E
    out = (size[0] + OUT_SIZE_DELTA[0], size[1] + OUT_SIZE_DELTA[1])
    ours = model.predict_logits(image, text, out_size=out)  # Q x H0 x W0
    expected = ref.predict_logits(model, image, text, out)  # Q x H0 x W0
    assert ours.shape == expected.shape == (text.shape[0], *out)
    assert not torch.isnan(expected).any()
    return float((ours - expected).abs().max())


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("method", ["proxyclip", "maskclip", "clip"])
def test_logits_match_reference(method: str, size: tuple[int, int]) -> None:
    assert _max_diff(tiny_model(method=method), size) < 1e-5


@pytest.mark.parametrize("size", [(80, 100), (50, 200), (20, 30), (150, 223), (300, 170)])
def test_logits_match_reference_dino_patch16(size: tuple[int, int]) -> None:
    """DINO with 16-px patches: VFM and CLIP grids coincide; padded windows of 56 or 168 px are
    not multiples of 16, and both DINO and CLIP floor their grids (a strided conv drops the rest)."""
    assert _max_diff(tiny_model(vfm=tiny_dino(patch=16)), size) < 1e-5


@pytest.mark.parametrize(("beta", "gamma"), [(0.8, 5.0), (1.5, 1.0), (0.0, 3.0)])
def test_logits_match_reference_other_beta_gamma(beta: float, gamma: float) -> None:
    assert _max_diff(tiny_model(beta=beta, gamma=gamma), SIZES["several-windows"]) < 1e-5


def test_window_batch_does_not_change_logits() -> None:
    """Windows batched together keep per-window statistics: same as the one-at-a-time reference."""
    size = SIZES["many-windows"]
    assert _max_diff(tiny_model(window_batch=1), size) < 1e-5
    assert _max_diff(tiny_model(window_batch=3), size) < 1e-5


def test_text_embeddings_match_reference() -> None:
    model = tiny_model()
    queries = [q for names in CLASSES for q in names]
    expected = ref.query_features(model.clip_model, model.tokenizer, queries)  # Q x E
    assert (model.encode_classes(CLASSES) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_classify_matches_reference(threshold: float) -> None:
    model = tiny_model(bg_threshold=threshold)
    torch.manual_seed(1)
    logits = torch.randn(7, 40, 50) * 0.1  # Q x H x W cosine logits, 7 queries for 4 classes
    labels, probs = model.classify(logits, CLASSES)
    expected_labels, expected_probs = ref.postprocess_result(
        logits[None], ref.query_index(CLASSES), model.config.logit_scale, threshold
    )
    assert torch.equal(labels, expected_labels)
    assert (probs - expected_probs).abs().max() < 1e-6
    if threshold:
        assert (labels == 0).any() and (labels != 0).any()  # the threshold did something


@pytest.mark.parametrize("shape", [(90, 130), (300, 70), (200, 160)])
def test_segment_matches_reference(shape: tuple[int, int]) -> None:
    """The whole pipeline from uint8 pixels (resize included: short side 100) to labels."""
    model = tiny_model(short_side=100, bg_threshold=0.3)
    pixels = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)  # H x W x 3
    pixels[:, : shape[1] // 2] //= 4  # a dark half and a bright half
    result = model.segment(pixels, CLASSES, return_probs=True)
    labels, probs = ref.segment(model, pixels, CLASSES)
    # Flat regions can make every entry of a row negative with tiny random DINOs; the published
    # code then gives NaN (see below). These images stay clear of that.
    assert not torch.isnan(probs).any()
    assert result.labels.shape == shape
    np.testing.assert_array_equal(result.labels, labels.numpy())
    np.testing.assert_allclose(result.probs, probs.numpy(), atol=1e-5)
    assert len(np.unique(result.labels)) > 1  # not a degenerate constant map


# ---- rows whose every entry is masked: the published code gives NaN, ours keeps the row's max ----

class ConstantVFM(nn.Module):
    """A VFM whose patch tokens are all the unit vector e_0: S = 1 everywhere, so with beta > 1
    every entry of A = gamma * (S - beta * mean(S)) is negative and eq. 7 masks whole rows."""

    def __init__(self, patch: int = 8, channels: int = 4):
        super().__init__()
        self.patch_size, self.channels = patch, channels
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        feats = images.new_zeros(b, self.channels, h // self.patch_size, w // self.patch_size)  # B x C x h x w
        feats[:, 0] = 1.0
        return feats


def test_all_masked_rows_published_nan_ours_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    vfm = ConstantVFM()
    model = tiny_model(vfm=vfm)
    monkeypatch.setattr(ref, "vfm_features", lambda _vfm, images, _crop: vfm(images))
    constant = ref.PublishedVFM("constant", {}, 1)
    torch.manual_seed(0)
    image = torch.randn(3, 150, 223)
    text = model.encode_classes(CLASSES)
    published = ref.predict_logits(model, image, text, (150, 223), constant)
    assert torch.isnan(published).all()  # the published code: softmax over a row of -inf

    ours = model.predict_logits(image, text, out_size=(150, 223))
    assert torch.isfinite(ours).all()
    # Every entry of a row equals the row's max, so ours keeps them all: uniform attention, which
    # the published code gives with beta = 0 (then A = gamma > 0 everywhere, nothing masked).
    uniform = ref.predict_logits(model.with_config(beta=0.0), image, text, (150, 223), constant)
    assert (ours - uniform).abs().max() < 1e-5


def test_reference_refuses_vfms_it_does_not_transcribe() -> None:
    with pytest.raises(ValueError, match="DINO"):
        ref.published_vfm(ConstantVFM())
    with pytest.raises(ValueError, match="unknown VFM kind"):
        ref.vfm_features(ref.PublishedVFM("clip", {}, 1), torch.zeros(1, 3, 56, 56), 56)


# ---- every VFM from its original checkpoint, the whole pipeline from uint8 pixels ----

TINY_P14 = "proxyclip-test-tiny-p14"  # a CLIP with 14-px patches, as ViT-L/14
open_clip.add_model_config(Path(__file__).parent / "configs" / f"{TINY_P14}.json")


def _published_pair(kind: str, tmp_path: Path, clip: str = TINY_CLIP, **config) -> tuple[ProxyCLIP, ref.PublishedVFM]:
    """proxyclip with ``kind`` loaded from an original checkpoint file, and the oracle's VFM from the
    same checkpoint as the original code reads it."""
    checkpoint = originals.original_state(kind, seed=3, decoder=kind == "mae")
    path = tmp_path / f"{kind}.pth"
    torch.save(checkpoint, path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip_model = open_clip.create_model(clip, pretrained=None).eval().requires_grad_(False)
    config.setdefault("window", 112)
    config.setdefault("stride", 56)
    cfg = ProxyCLIPConfig.create(clip=clip, clip_pretrained="", **config)
    model = ProxyCLIP(clip_model, open_clip.get_tokenizer(clip), originals.load_vfm(kind, path), cfg)
    return model, originals.published(kind, checkpoint)


@pytest.mark.parametrize("clip", [TINY_CLIP, TINY_P14], ids=["patch16", "patch14"])
@pytest.mark.parametrize("kind", ["dino", "dinov2", "sam", "mae"])
def test_segment_matches_published_pipeline(kind: str, clip: str, tmp_path: Path) -> None:
    """Decoding aside, everything from uint8 pixels to probabilities: the protocol's resize (OpenCV,
    mmcv's size rule), the published constants, windows, each VFM as its original code computes it."""
    model, vfm = _published_pair(kind, tmp_path, clip, short_side=112, bg_threshold=0.3)
    pixels = np.random.default_rng(7).integers(0, 256, (75, 130, 3), dtype=np.uint8)  # -> 112 x 194
    pixels[:, :60] //= 3
    result = model.segment(pixels, CLASSES, return_probs=True)
    labels, probs = ref.segment(model, pixels, CLASSES, vfm)
    assert not torch.isnan(probs).any()
    assert np.abs(result.probs - probs.numpy()).max() < 5e-5
    np.testing.assert_array_equal(result.labels, labels.numpy())
    assert probs.std() > 1e-3  # probabilities vary: the comparison is not trivially uniform == uniform


@pytest.mark.parametrize("kind", ["dinov2", "sam", "mae"])
@pytest.mark.parametrize("size", [(80, 100), (150, 223)])
def test_logits_match_reference_other_vfms(kind: str, size: tuple[int, int], tmp_path: Path) -> None:
    """Padded and shifted windows with DINOv2, SAM and MAE (CLIP-normalised input)."""
    model, vfm = _published_pair(kind, tmp_path)
    torch.manual_seed(0)
    image = torch.randn(3, *size)
    text = model.encode_classes(CLASSES)
    ours = model.predict_logits(image, text, out_size=size)
    expected = ref.predict_logits(model, image, text, size, vfm)
    assert (ours - expected).abs().max() < 1e-5


# ---- full-size architectures, random weights ----

@pytest.mark.fullsize
def test_fullsize_vitb16_dino_b8_matches_reference(tmp_path: Path) -> None:
    """CLIP ViT-B/16 + DINO ViT-B/8, a 336 x 448 image: two 336-px windows, averaged and resized.

    DINO's weights are timm's random initialisation with noise added and saved in DINO's original
    layout (as in the tests below): with timm's bare initialisation the patch similarities of a
    deep random ViT are nearly all equal, so eq. 7's mask sits on its threshold and rounding
    decides it, which compares nothing."""
    checkpoint = originals.original_state("dino", seed=3, full=True, jitter=0.02, model_name="vit_base_patch8_224.dino")
    path = tmp_path / "dino.pth"
    torch.save(checkpoint, path)
    vfm = VFM_BUILDERS["dino_vitb8"](weights=str(path))
    torch.manual_seed(0)
    model = ProxyCLIP(*load_clip("ViT-B-16", "openai", random_weights=True), vfm,
                      ProxyCLIPConfig(clip="ViT-B-16", vfm="dino_vitb8"))
    torch.manual_seed(0)
    image = torch.randn(3, 336, 448)  # after the protocol's resize (short side 336)
    text = torch.nn.functional.normalize(torch.randn(6, 512), dim=-1)  # Q x E, random unit queries
    ours = model.predict_logits(image, text, out_size=(375, 500))
    expected = ref.predict_logits(model, image, text, (375, 500), originals.published("dino", checkpoint, 12))
    assert ours.shape == expected.shape == (6, 375, 500)
    assert (ours - expected).abs().max() < 1e-4
    assert ours.std() > 1e-3  # logits vary over the image: the comparison is not trivially 0 == 0


FULLSIZE = [("ViT-B-16", "dinov2"), ("ViT-B-16", "mae"), ("ViT-B-16", "sam"), ("ViT-L-14", "dino")]


@pytest.mark.fullsize
@pytest.mark.parametrize(("clip", "kind"), FULLSIZE, ids=[f"{c}-{k}" for c, k in FULLSIZE])
def test_fullsize_segment_matches_published(clip: str, kind: str, tmp_path: Path) -> None:
    """The full-size architectures (random weights saved in the original layouts): one 300 x 300
    image, resized to one 336 x 336 window; probabilities within 5e-5 of the published pipeline's."""
    key = {"dino": "dino_vitb8", "dinov2": "dinov2_vitb14_reg", "mae": "mae_vitb16", "sam": "sam_vitb"}[kind]
    name = "vit_base_patch8_224.dino" if kind == "dino" else None  # DINO B/8, the paper's default
    checkpoint = originals.original_state(kind, seed=3, full=True, jitter=0.02, model_name=name)
    path = tmp_path / f"{kind}.pth"
    torch.save(checkpoint, path)
    vfm = VFM_BUILDERS[key](weights=str(path))
    model = ProxyCLIP(*load_clip(clip, "openai", random_weights=True), vfm, ProxyCLIPConfig(clip=clip, vfm=key))
    pixels = np.random.default_rng(7).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    pixels[:, :150] //= 3
    classes = [["cat"], ["grass"]]
    result = model.segment(pixels, classes, return_probs=True)
    labels, probs = ref.segment(model, pixels, classes, originals.published(kind, checkpoint, 12))
    assert np.abs(result.probs - probs.numpy()).max() < 5e-5
    assert probs.std() > 1e-3  # (labels may flip where two probabilities are within ~1e-6)
