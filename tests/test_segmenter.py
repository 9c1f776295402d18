"""The segmenter on tiny random models: properties of the method and of the API."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.errors import ProxyCLIPError


class RegionVFM(nn.Module):
    """A stand-in VFM whose patch tokens encode image regions exactly (one-hot region ids)."""

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, regions: torch.Tensor, num_regions: int):
        super().__init__()
        self.register_buffer("onehot", F.one_hot(regions, num_regions).permute(2, 0, 1).float())  # K x h x w

    def forward(self, images):
        return self.onehot.expand(images.shape[0], -1, -1, -1)


def region_map(h: int, w: int) -> torch.Tensor:
    regions = torch.zeros(h, w, dtype=torch.long)
    regions[: h // 2, w // 3 :] = 1
    regions[h // 2 :, : w // 2] = 2
    regions[h - 3 :, w - 4 :] = 3
    return regions


def test_labels_are_constant_within_each_region():
    """With region-exact proxy attention every patch of a region gets the same feature."""
    grid = 14  # a 112 px window with an 8 px VFM patch
    regions = region_map(grid, grid)
    model = tiny_model(vfm=RegionVFM(regions, 4), window=112, stride=112)
    torch.manual_seed(0)
    image = torch.randn(1, 3, 112, 112)
    feats = model.window_features(image)[0]  # E x 14 x 14
    for r in range(4):
        inside = feats[:, regions == r]  # E x n
        torch.testing.assert_close(inside, inside[:, :1].expand_as(inside))
    # so the labels are constant inside each region, away from its border (bilinear upsampling)
    text = model.encode_classes(["a", "b", "c", "d", "e"])
    labels, _ = model.classify(model.predict_logits(image[0], text), ["a", "b", "c", "d", "e"])
    pixel_regions = regions.repeat_interleave(8, 0).repeat_interleave(8, 1)
    eroded = -F.max_pool2d(-(pixel_regions[None, None].float()), 17, 1, 8)[0, 0]
    dilated = F.max_pool2d(pixel_regions[None, None].float(), 17, 1, 8)[0, 0]
    interior = eroded == dilated  # pixels at least 8 px from another region
    for r in range(4):
        inside = labels[interior & (pixel_regions == r)]
        if inside.numel():
            assert inside.unique().numel() == 1


def test_batched_windows_equal_one_window_at_a_time(model):
    torch.manual_seed(0)
    windows = torch.randn(5, 3, 112, 112)
    text = model.encode_classes(["cat", "dog", "sky"])
    batched = model.window_logits(windows, text)
    single = torch.cat([model.window_logits(w[None], text) for w in windows])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_segment_shapes_and_probabilities(model, rng):
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    result = model.segment(image, ["cat; kitten", "dog", "sky"], return_probs=True)
    assert result.labels.shape == (70, 90) and result.labels.dtype == np.uint8  # 1 byte a pixel up to 256 classes
    assert result.probs.shape == (3, 70, 90)
    assert result.labels.min() >= 0 and result.labels.max() < 3
    assert np.array_equal(result.labels, result.probs.argmax(0))
    assert (result.probs <= 1 + 1e-6).all()


def test_synonyms_take_the_max_after_the_softmax(model):
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 7)
    labels, probs = model.classify(logits, ["a; b", "c", "d"])
    soft = (logits * 40).softmax(0)
    torch.testing.assert_close(probs, torch.stack([soft[:2].amax(0), soft[2], soft[3]]))
    assert torch.equal(labels, probs.argmax(0))


def test_background_threshold_sets_class_zero(model):
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 8) * 0.01  # near-uniform probabilities, all below 0.9
    plain, probs = model.classify(logits, ["bg", "x", "y"])
    assert (plain != 0).any()
    thresholded, _ = model.with_config(bg_threshold=0.9).classify(logits, ["bg", "x", "y"])
    assert (thresholded == 0).all()
    some, _ = model.with_config(bg_threshold=float(probs.amax(0).median())).classify(logits, ["bg", "x", "y"])
    assert (some == 0).sum() > (plain == 0).sum()


def test_text_embeddings_are_cached(model):
    a = model.encode_classes(["cat", "dog"])
    assert model.encode_classes(["cat", "dog"]) is a
    assert model.with_config(beta=1.0).encode_classes(["cat", "dog"]) is a
    assert model.encode_classes(["dog", "cat"]) is not a


@pytest.mark.parametrize("size", [(1, 1), (5, 300), (57, 111), (120, 130)])
def test_any_image_size(model, rng, size):
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    assert model.segment(image, ["a", "b"]).labels.shape == size


def test_resize_rule_keeps_output_at_original_size(rng):
    model = tiny_model(short_side=112, long_side=400)
    image = rng.integers(0, 256, (50, 300, 3), dtype=np.uint8)
    assert model.preprocess(image).shape == (3, 67, 400)
    assert model.segment(image, ["a", "b"]).labels.shape == (50, 300)


@pytest.mark.parametrize("method", ["maskclip", "clip"])
def test_baselines_run_without_vfm(method, rng):
    model = tiny_model(method=method)
    assert model.vfm is None
    feats = model.window_features(torch.randn(2, 3, 112, 112))
    assert feats.shape[-2:] == (7, 7)  # CLIP's own grid
    assert model.segment(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), ["a", "b"]).labels.shape == (40, 50)


def test_maskclip_equals_proxyclip_with_identity_attention():
    """MaskCLIP is proxy attention where each patch attends only to itself."""

    class OneHotVFM(nn.Module):
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

        def forward(self, images):  # one distinct token per CLIP patch
            n = images.shape[-1] // 16
            return torch.eye(n * n).view(n * n, n, n).expand(images.shape[0], -1, -1, -1)

    proxy = tiny_model(vfm=OneHotVFM())
    mask = proxy.with_config(method="maskclip")
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(proxy.window_features(x), mask.window_features(x))


def test_bfloat16_runs_and_stays_close(rng):
    model = tiny_model()
    image = torch.randn(3, 112, 150)
    text = model.encode_classes(["a", "b", "c"])
    ref = model.predict_logits(image, text)
    model.clip_model.to(torch.bfloat16)
    model.vfm.to(torch.bfloat16)
    low = model.predict_logits(image, model.encode_classes(["a", "b", "c"]).to(torch.bfloat16))
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05


def test_config_validation():
    with pytest.raises(ProxyCLIPError, match="VFM"):
        ProxyCLIP.build(ProxyCLIPConfig(vfm="dino_vitz99"), random_weights=True)
    with pytest.raises(ProxyCLIPError, match="stride"):
        ProxyCLIPConfig(window=112, stride=200)
    with pytest.raises(ProxyCLIPError, match="threshold"):
        ProxyCLIPConfig(bg_threshold=1.5)
    with pytest.raises(ProxyCLIPError, match="method"):
        ProxyCLIPConfig(method="no_such_method")
    with pytest.raises(ProxyCLIPError, match="new weights"):
        tiny_model().with_config(vfm="dino_vits16")


@pytest.mark.parametrize("src,dst", [((7, 9), (50, 61)), ((40, 30), (13, 17)), ((5, 5), (5, 8)), ((1, 3), (9, 4))])
def test_resize_rows_equals_bilinear_interpolation(src, dst):
    from proxyclip.model.segmenter import resize_rows

    torch.manual_seed(0)
    logits = torch.randn(3, *src)
    full = F.interpolate(logits[None], size=dst, mode="bilinear", align_corners=False)[0]
    bands = torch.cat([resize_rows(logits, dst, top, min(top + 4, dst[0])) for top in range(0, dst[0], 4)], dim=1)
    torch.testing.assert_close(bands, full, rtol=0, atol=1e-6)


def test_segment_in_bands_equals_segment_at_once(model, rng):
    image = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    whole = model.segment(image, ["a; b", "c", "d"], return_probs=True)
    model.band_elements = 3 * 70 * 7  # bands of 7 rows
    banded = model.segment(image, ["a; b", "c", "d"], return_probs=True)
    np.testing.assert_allclose(banded.probs, whole.probs, rtol=0, atol=1e-6)
    assert (banded.labels == whole.labels).mean() > 0.999
    assert model.segment(image, ["a", "b"]).probs is None  # not by default: C x H x W float32 can be huge


def test_text_cache_is_bounded(model):
    model.text_cache_size = 2
    a = model.encode_classes(["a"])
    model.encode_classes(["b"])
    assert model.encode_classes(["a"]) is a  # used again: now the most recent
    model.encode_classes(["c"])  # evicts ["b"]
    assert len(model._text_cache) == 2 and model.encode_classes(["a"]) is a


def test_switching_methods_back_and_forth(rng):
    model = tiny_model()
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    first = model.segment(image, ["a", "b"], return_probs=True).probs
    again = model.with_config(method="maskclip").with_config(method="proxyclip").segment(image, ["a", "b"], return_probs=True).probs
    np.testing.assert_array_equal(first, again)


def test_window_sized_vfm_follows_the_configured_window():
    """A VFM that runs at the protocol's window size (MAE) gets every window, padded or not,
    resized to the window of the current config, also after with_config."""

    class WindowSizedVFM(nn.Module):
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        runs_at_window = True

        def __init__(self):
            super().__init__()
            self.sizes = []

        def forward(self, images):
            self.sizes.append(tuple(images.shape[-2:]))
            return images[:, :, ::8, ::8]  # N x 3 x h/8 x w/8

    vfm = WindowSizedVFM()
    model = tiny_model(vfm=vfm, window=112, stride=56)
    model.window_features(torch.randn(1, 3, 56, 112))  # a padded window of a small image
    model.with_config(window=168, stride=84).window_features(torch.randn(1, 3, 168, 168))
    assert vfm.sizes == [(112, 112), (168, 168)]


def test_astype_copies_the_models_in_another_dtype():
    from conftest import tiny_dino

    model = tiny_model(vfm=tiny_dino())
    low = model.astype(torch.bfloat16)
    assert low.dtype == torch.bfloat16 and next(low.vfm.parameters()).dtype == torch.bfloat16
    assert model.dtype == torch.float32 and next(model.vfm.parameters()).dtype == torch.float32  # a copy
    image = torch.randn(3, 112, 150)
    ref = model.predict_logits(image, model.encode_classes(["a", "b"]))
    out = low.predict_logits(image, low.encode_classes(["a", "b"]))
    assert (out - ref).abs().max() < 0.05


def test_labels_at_a_large_size_are_small_and_built_in_bounded_bands(monkeypatch):
    from proxyclip.model import segmenter

    model = tiny_model()
    logits = torch.randn(3, 40, 60)
    bands = []
    resize_rows = segmenter.resize_rows

    def spy(*args, **kwargs):
        band = resize_rows(*args, **kwargs)
        bands.append(band.numel() * band.element_size())
        return band

    monkeypatch.setattr(segmenter, "resize_rows", spy)
    labels, probs = model.classify_at_size(logits, (2000, 3000), ["a", "b", "c"])
    assert labels.dtype == np.uint8 and labels.shape == (2000, 3000) and probs is None  # 6 MB, not 48 MB in int64
    assert len(bands) > 1 and max(bands) <= 16 * 2**20  # each band's resized logits; softmax & co. copy them a few times
    whole = F.interpolate(logits[None], size=(2000, 3000), mode="bilinear", align_corners=False)[0]
    assert (labels == whole.argmax(0).numpy()).mean() > 0.9999  # the bands join up (float rounding aside)
