"""Image reading edge cases, the protocol's resize rule, overlays and the memory of large images."""

import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from proxyclip.errors import ImageError
from proxyclip.images import (
    MAX_PIXELS_ENV,
    classes_by_area,
    label_dtype,
    label_image,
    load_image,
    overlay_image,
    palette,
    pixel_limit,
    rescaled_size,
    resize_keep_ratio,
    set_pixel_limit,
    write_atomically,
)


def save(tmp_path, img: Image.Image, name: str, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,name",
    [("L", "g.png"), ("RGBA", "a.png"), ("P", "p.png"), ("CMYK", "c.jpg"), ("1", "b.png"), ("LA", "la.png"), ("RGB", "x.webp")],
)
def test_modes_become_rgb(tmp_path, mode, name):
    img = Image.new(mode, (7, 5))
    out = load_image(save(tmp_path, img, name))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8


def test_16_bit_is_scaled(tmp_path):
    arr = np.full((4, 6), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    path = save(tmp_path, Image.fromarray(arr), "d.png")
    out = load_image(path)
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_alpha_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    assert load_image(save(tmp_path, img, "t.png"))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = save(tmp_path, img, "r.jpg", exif=exif)
    assert load_image(path).shape == (40, 20, 3)


def test_bad_files(tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageError, match="text.jpg"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    good = save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "t.jpg")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(tmp_path / "truncated.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError):
        load_image(tmp_path / "empty.png")


def test_arrays_and_pil_images():
    assert load_image(np.zeros((3, 4), np.uint8)).shape == (3, 4, 3)
    assert load_image(np.ones((3, 4, 3), np.float32))[0, 0].tolist() == [255, 255, 255]
    assert load_image(Image.new("L", (4, 3))).shape == (3, 4, 3)
    with pytest.raises(ImageError):
        load_image(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(ImageError):
        load_image(np.zeros((0, 4, 3), np.uint8))


def test_rescale_rule():
    assert rescaled_size(375, 500, 336, 2048) == (336, 448)
    assert rescaled_size(1024, 2048, 448, 2048) == (448, 896)
    assert rescaled_size(100, 5000, 336, 2048) == (41, 2048)  # the long side caps the scale
    assert rescaled_size(1, 1, 336, 2048) == (336, 336)


def _mmcv_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size((w, h), scale) written out independently, returned as (h, w)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (427, 640), (1024, 2048), (2448, 3264), (281, 500), (7, 9)])
@pytest.mark.parametrize(("short", "long"), [(336, 2048), (448, 2048), (2048, 336)])
def test_rescale_rule_is_mmcv(shape, short, long):
    """mmcv takes max / min of the scale tuple, whatever its order, and rounds with int(x + 0.5)."""
    assert rescaled_size(*shape, short, long) == _mmcv_size(*shape, (long, short))


def _photo_like(shape, seed=0) -> np.ndarray:
    """H x W x 3 uint8: smooth gradients, edges and noise, like photos (not only noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    base = np.stack([x / shape[1] * 255, y / shape[0] * 255, 128 + 100 * np.sin(x / 7 + y / 11)], axis=-1)
    base[shape[0] // 3 : shape[0] // 2, shape[1] // 4 :] = (250, 20, 90)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("shape", "short"), [((375, 500), 336), ((300, 533), 448), ((900, 1200), 448), ((60, 45), 336)])
def test_resize_is_opencv_inter_linear(shape, short):
    """Exactly mmcv's Resize(keep_ratio=True): cv2.resize INTER_LINEAR (fixed point), up and down."""
    import cv2

    pixels = _photo_like(shape)
    out = resize_keep_ratio(torch.from_numpy(pixels).permute(2, 0, 1), short, 2048)
    h, w = _mmcv_size(*shape, (2048, short))
    expected = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR)
    assert out.dtype == torch.uint8 and out.shape == (3, h, w)
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expected)
    # PyTorch's float bilinear, what this replaced, is one grey level off on many values
    torch_bilinear = torch.nn.functional.interpolate(
        torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), size=(h, w), mode="bilinear", align_corners=False
    )[0].round().clamp(0, 255).to(torch.uint8)
    assert (torch_bilinear != out).float().mean() > 0.01


def test_resize_keeps_the_image_at_its_size():
    pixels = torch.from_numpy(_photo_like((336, 448))).permute(2, 0, 1)
    assert resize_keep_ratio(pixels, 336, 2048) is pixels


def test_eval_loader_resizes_as_segment(tmp_path):
    """The evaluation's worker-side resize (runner._Items) is the same OpenCV resize."""
    import cv2
    from test_datasets import make_dataset

    from proxyclip.evaluation.datasets import SegmentationDataset
    from proxyclip.evaluation.presets import PRESETS
    from proxyclip.evaluation.runner import _Items

    data = SegmentationDataset(PRESETS["voc21"], make_dataset(PRESETS["voc21"], tmp_path, n=1))
    item = _Items(data, [0], 64, 2048, keep_image=True)[0]
    image = item["image"]  # H x W x 3 uint8, as decoded
    h, w = _mmcv_size(*image.shape[:2], (2048, 64))
    np.testing.assert_array_equal(item["resized"], cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))


def test_label_png_round_trip(tmp_path):
    labels = np.array([[0, 1], [2, 20]])
    img = label_image(labels, 21)
    assert img.mode == "P"
    img.save(tmp_path / "l.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "l.png")), labels)
    big = label_image(np.array([[0, 300]]), 847)
    assert np.asarray(big).tolist() == [[0, 300]]
    assert label_image(labels, 847).mode != "P"  # the class count decides, not the labels present


def test_palette_is_voc_with_a_visible_class_0():
    assert palette(3).tolist() == [[255, 176, 0], [128, 0, 0], [0, 128, 0]]  # VOC's, but class 0 is not black
    for n in (1, 21, 256, 847):
        colours = palette(n)
        assert len({tuple(c) for c in colours}) == n and colours.max(axis=1).min() > 0  # distinct, none black
    assert palette(256)[1:].tolist() == palette(300)[1:256].tolist()  # the class count changes no colour


def test_overlay_has_legend_width():
    image = np.zeros((50, 60, 3), np.uint8)
    labels = np.zeros((50, 60), np.int64)
    labels[:, 30:] = 2
    out = overlay_image(image, labels, ["sky", "tree", "a long class name"])
    assert out.height >= 50 and out.width > 60 + 50


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    class Broken:
        pass

    good = tmp_path / "a.png"
    with pytest.raises(ValueError, match="pickle"):
        write_atomically({good: Image.new("RGB", (2, 2)), tmp_path / "b.npy": Broken()})
    assert list(tmp_path.iterdir()) == []
    write_atomically({good: Image.new("RGB", (2, 2)), tmp_path / "b.npy": np.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.npy"]


def test_atomic_write_of_text_into_a_new_folder(tmp_path):
    target = tmp_path / "new" / "sub" / "r.json"
    write_atomically({target: '{"a": 1}\n'})
    assert target.read_text() == '{"a": 1}\n'
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]  # no temporary file left


# ---- large images: the limit, and memory -------------------------------------------------------

@pytest.fixture
def pixel_limit_restored(monkeypatch):
    """set_pixel_limit changes process-wide settings: restore them after the test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv(MAX_PIXELS_ENV, "")  # unset: Pillow's limit; deleted again after the test


def test_the_decompression_bomb_guard_names_the_option_that_raises_it(tmp_path, pixel_limit_restored):
    path = save(tmp_path, Image.new("L", (300, 200)), "big.png")
    set_pixel_limit(50_000)
    with pytest.raises(ImageError, match=r"300 x 200 = 60,000 pixels, over the limit of 50,000 .* --max-pixels 60000"):
        load_image(path)
    Image.MAX_IMAGE_PIXELS = 20_000  # Pillow refuses outright above twice its own limit ...
    with pytest.raises(ImageError, match=r"60,000 pixels, over the limit of 50,000 .* --max-pixels 60000"):
        load_image(path)
    set_pixel_limit(60_000)  # ... and the option raises both
    assert load_image(path).shape == (200, 300, 3) and pixel_limit() == 60_000


def test_the_pixel_limit_reaches_processes_started_later(tmp_path, pixel_limit_restored):
    path = save(tmp_path, Image.new("L", (300, 200)), "big.png")
    set_pixel_limit(70_000)
    Image.MAX_IMAGE_PIXELS = 50_000  # a fresh loader process: Pillow's default, the limit in the environment
    assert load_image(path).shape == (200, 300, 3)


def _traced_peak(fn, *args, **kwargs):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args, **kwargs)
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_load_image_copies_a_large_image_once(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    path = save(tmp_path, Image.fromarray(pixels), "big.png", compress_level=0)
    out, peak = _traced_peak(load_image, path)  # numpy and Python allocations (Pillow's own are not traced)
    assert peak < 1.2 * pixels.nbytes  # the result and a band; np.asarray(PIL image) held 2x more
    assert np.array_equal(out, pixels) and out.flags.writeable


def test_overlay_blends_a_band_at_a_time():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    labels = np.zeros((3000, 4000), np.uint8)
    labels[500:, 1000:] = 1
    out, peak = _traced_peak(overlay_image, image, labels, ["sky", "tree"])
    assert peak < 0.5 * image.nbytes  # the bands' temporaries; blending at once took 12x the image in float32
    rows = np.r_[0:100, 2900:3000]  # the same pixels as blending all at once
    expected = image[rows].astype(np.float32) * 0.5 + palette(2)[labels[rows]].astype(np.float32) * 0.5
    assert np.array_equal(np.asarray(out)[rows, :4000], expected.round().astype(np.uint8))


def test_resize_reads_the_image_in_place(monkeypatch):
    """No full-size copy: the 3 x H x W view of an H x W x 3 array goes to OpenCV as the array itself (uint8)."""
    import cv2

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (1500, 1000, 3), dtype=np.uint8)
    seen = []
    resize = cv2.resize

    def spy(src, *args, **kwargs):
        seen.append(src)
        return resize(src, *args, **kwargs)

    monkeypatch.setattr(cv2, "resize", spy)
    out = resize_keep_ratio(torch.from_numpy(hwc).permute(2, 0, 1), 336, 2048)
    assert out.shape == (3, 504, 336) and out.dtype == torch.uint8
    assert len(seen) == 1 and seen[0].dtype == np.uint8 and np.shares_memory(seen[0], hwc)  # no float or uint8 copy
    assert np.array_equal(out.permute(1, 2, 0).numpy(), resize(hwc, (336, 504), interpolation=cv2.INTER_LINEAR))


def test_label_dtype_is_the_smallest_that_holds_the_classes():
    assert [label_dtype(n) for n in (1, 256, 257, 32768, 40000)] == [np.uint8, np.uint8, np.int16, np.int16, np.int32]
    assert label_image(np.array([[0, 255]], np.uint8), 256).mode == "P"


def test_classes_by_area_counts_in_bands():
    labels = np.zeros((1000, 1000), np.uint8)
    labels[:100] = 3
    labels[100:150] = 7
    assert classes_by_area(labels) == [(0, 0.85), (3, 0.1), (7, 0.05)]
    tie = np.array([[2, 2, 1, 1]])
    assert classes_by_area(tie) == [(1, 0.5), (2, 0.5)]  # ties: lower class first


# ---- legends -------------------------------------------------------------------------------------

def test_class_0_has_a_visible_colour_on_the_overlay():
    image = np.full((40, 60, 3), 128, np.uint8)
    labels = np.zeros((40, 60), np.uint8)
    out = np.asarray(overlay_image(image, labels, ["background", "cat"]))[:40, :60]
    colour = out[20, 30].astype(int)
    assert colour.max() - colour.min() > 40  # a colour, not black darkening the grey (64, 64, 64)
    png = label_image(labels, 2)
    assert png.getpalette()[:3] == palette(2)[0].tolist()  # the label PNG's palette says the same


def _text_rows(canvas: np.ndarray, x0: int) -> int:
    """Height of the dark (text) pixels right of column x0."""
    dark = (canvas[:, x0:] < 60).all(axis=2)
    rows = np.flatnonzero(dark.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def test_the_legend_grows_with_the_image():
    small = np.asarray(overlay_image(np.zeros((240, 320, 3), np.uint8), np.zeros((240, 320), np.uint8), ["sky"]))
    labels = np.zeros((2400, 3200), np.uint8)
    large = np.asarray(overlay_image(np.zeros((2400, 3200, 3), np.uint8), labels, ["sky"]))
    assert large.shape[0] == 2400  # the legend fits beside the image
    assert _text_rows(large, 3200 + 2400 // 30 + 20) >= 5 * _text_rows(small, 320 + 12 + 20)  # 1/30 of the short side, not 12 px
    assert _text_rows(large, 3200 + 2400 // 30 + 20) >= 2400 / 60  # legible when shown 1/10 of its size


def test_a_long_legend_wraps_into_columns_beside_the_image():
    labels = np.repeat(np.arange(30, dtype=np.uint8), 4)[None].repeat(100, axis=0)  # 100 x 120, 30 classes
    out = overlay_image(np.zeros((100, 120, 3), np.uint8), labels, [f"class {i}" for i in range(30)])
    assert out.height == 100 and out.width > 120 + 3 * 60


def test_the_legend_can_go_below_the_image():
    labels = np.zeros((100, 400), np.uint8)
    labels[:, 200:] = 1
    out = overlay_image(np.zeros((100, 400, 3), np.uint8), labels, ["sky", "sea"], legend="below", font_size=20)
    assert out.width == 400 and 100 + 20 < out.height < 100 + 3 * 20
