"""Image reading edge cases and the protocol's resize rule."""

import numpy as np
import pytest
import torch
from PIL import Image

from proxyclip.errors import ImageError
from proxyclip.images import (
    label_image,
    load_image,
    overlay_image,
    palette,
    rescaled_size,
    resize_keep_ratio,
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


def test_palette_is_voc():
    assert palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert len({tuple(c) for c in palette(256)}) == 256


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
