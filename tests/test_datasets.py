"""Dataset readers on synthetic mini datasets in each prepared layout; COCO-Object preparation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from proxyclip.apps.cli import main
from proxyclip.evaluation.datasets import (
    DatasetError,
    SegmentationDataset,
    coco_object_jobs,
    coco_object_lut,
    list_samples,
    read_label,
)
from proxyclip.evaluation.presets import PRESETS, DatasetPreset


def make_dataset(preset: DatasetPreset, root: Path, n: int = 4, size: tuple[int, int] = (40, 60), seed: int = 0) -> Path:
    """Write ``n`` random images and label maps in ``preset``'s layout under ``root``.

    Labels hold every kind of value the real data has: valid classes (before the label
    mapping), 255, and for 16-bit datasets the void value 65535. Sizes vary per image.
    """
    rng = np.random.default_rng(seed)
    ids = [f"city{i % 2}/city{i % 2}_{i:06d}" if preset.key == "cityscapes" else f"2008_{i:06d}" for i in range(n)]
    raw_classes = preset.num_classes + (1 if preset.reduce_zero_label else 0)
    for k, i in enumerate(ids):
        h, w = size[0] + 4 * k, size[1] - 2 * k
        image = root / preset.image_dir / f"{i}{preset.image_suffix}"
        label = root / preset.label_dir / f"{i}{preset.label_suffix}"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image, quality=95) if image.suffix == ".jpg" else Image.fromarray(pixels).save(image)
        values = rng.integers(0, raw_classes, (h, w))
        values[rng.random((h, w)) < 0.1] = 255
        if preset.label_dtype == "uint16":
            values[rng.random((h, w)) < 0.1] = 65535
            Image.fromarray(values.astype(np.uint16)).save(label, "TIFF")
        elif preset.key.startswith("voc"):
            img = Image.fromarray(values.astype(np.uint8), mode="P")
            img.putpalette([v for c in range(256) for v in (c, 255 - c, (7 * c) % 256)])
            img.save(label)
        else:
            Image.fromarray(values.astype(np.uint8)).save(label)
    if preset.split_file:
        split = root / preset.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(ids) + "\n")
    return root


@pytest.mark.parametrize("key", list(PRESETS))
def test_every_preset_layout_reads(key, tmp_path):
    preset = PRESETS[key]
    make_dataset(preset, tmp_path, n=3)
    data = SegmentationDataset(preset, tmp_path)
    assert len(data) == 3 and len(data.classes) == preset.num_classes
    for s in data.samples:
        labels = data.read_label(s.label)
        image = Image.open(s.image)
        assert labels.shape == (image.height, image.width) and labels.dtype == np.int64
        valid = labels[labels != data.ignore_index]
        if key in ("ade847", "context459"):
            assert set(np.unique(labels)) >= {65535}  # void kept, ignored by the correct ignore index
            valid = valid[valid != 255]
        assert valid.min() >= 0 and valid.max() < preset.num_classes


def test_scan_order_is_mmsegs_sorted_paths_and_recurses(tmp_path):
    preset = PRESETS["cityscapes"]
    make_dataset(preset, tmp_path, n=4)
    first = list_samples(preset, tmp_path)[0]
    for name in ("x", "x-1"):  # by id "x" < "x-1"; by path "x-1_leftImg8bit.png" < "x_leftImg8bit.png"
        for kind, suffix in (("image", preset.image_suffix), ("label", preset.label_suffix)):
            target = tmp_path / getattr(preset, f"{kind}_dir") / f"city0/{name}{suffix}"
            target.write_bytes(getattr(first, kind).read_bytes())
    ids = [s.id for s in list_samples(preset, tmp_path)]
    paths = [i + preset.image_suffix for i in ids]
    assert paths == sorted(paths) and ids[0].startswith("city0/") and len(ids) == 6
    assert ids.index("city0/x-1") < ids.index("city0/x")


def test_split_file_order_is_kept(tmp_path):
    preset = PRESETS["voc21"]
    make_dataset(preset, tmp_path, n=3)
    (tmp_path / preset.split_file).write_text("2008_000002\n2008_000000\n\n")
    assert [s.id for s in list_samples(preset, tmp_path)] == ["2008_000002", "2008_000000"]


def test_wrong_root_names_what_is_missing_and_the_layout(tmp_path):
    preset = PRESETS["voc21"]
    with pytest.raises(DatasetError, match="is not a folder.*JPEGImages.*VOCdevkit/VOC2012"):
        list_samples(preset, tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"JPEGImages: no such folder; expected the voc21 layout"):
        list_samples(preset, tmp_path)
    make_dataset(preset, tmp_path, n=3)
    (tmp_path / preset.split_file).unlink()
    with pytest.raises(DatasetError, match=r"val.txt: no such split file"):
        list_samples(preset, tmp_path)
    (tmp_path / preset.split_file).write_text("2008_000000\n2008_000001\n2008_000002\n")
    (tmp_path / "SegmentationClass" / "2008_000001.png").unlink()
    with pytest.raises(DatasetError, match=r"2008_000001.png: no such label file;"):
        list_samples(preset, tmp_path)
    (tmp_path / "JPEGImages" / "2008_000000.jpg").unlink()
    (tmp_path / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"2008_000000.jpg: no such image file \(and 1 more of 3\)"):
        list_samples(preset, tmp_path)


def test_empty_image_folder(tmp_path):
    preset = PRESETS["ade20k"]
    (tmp_path / preset.image_dir).mkdir(parents=True)
    (tmp_path / preset.label_dir).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images \*.jpg found under"):
        list_samples(preset, tmp_path)


def test_reduce_zero_label_as_mmseg(tmp_path):
    path = tmp_path / "l.png"
    Image.fromarray(np.array([[0, 1, 2, 150, 255, 254]], dtype=np.uint8)).save(path)
    assert read_label(path).tolist() == [[0, 1, 2, 150, 255, 254]]
    assert read_label(path, reduce_zero_label=True).tolist() == [[255, 0, 1, 149, 255, 253]]


def test_palette_labels_give_indices_not_colours(tmp_path):
    path = tmp_path / "l.png"
    img = Image.fromarray(np.array([[0, 15, 255]], dtype=np.uint8), mode="P")
    img.putpalette([200] * 768)
    img.save(path)
    assert read_label(path).tolist() == [[0, 15, 255]]


def test_16bit_tiff_labels_and_int32_mode(tmp_path):
    values = np.array([[0, 255, 846, 65535]], dtype=np.uint16)
    tif = tmp_path / "l.tif"
    Image.fromarray(values).save(tif, "TIFF")
    assert Image.open(tif).mode == "I;16"
    assert read_label(tif, "uint16").tolist() == [[0, 255, 846, 65535]]
    tif32 = tmp_path / "i.tif"
    Image.fromarray(values.astype(np.int32)).save(tif32, "TIFF")
    assert Image.open(tif32).mode == "I"
    assert read_label(tif32, "uint16").tolist() == [[0, 255, 846, 65535]]
    with pytest.raises(DatasetError, match="do not fit uint8; use a preset with label_dtype uint16"):
        read_label(tif, "uint8")


def test_bad_label_files(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(DatasetError, match="one channel of class indices.*mode RGB"):
        read_label(rgb)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(DatasetError, match="broken.png: cannot read the label map"):
        read_label(broken)
    with pytest.raises(DatasetError, match="no such label file"):
        read_label(tmp_path / "missing.png")


# ---- COCO-Object ------------------------------------------------------------------------------------

def test_coco_object_lut_from_train_ids():
    lut = coco_object_lut("train_ids")
    assert lut[0] == 1 and lut[79] == 80  # things 0..79 -> 1..80
    assert lut[80] == 0 and lut[170] == 0 and lut[255] == 0  # stuff and unlabeled -> background


def test_coco_object_lut_from_raw_ids_matches_published_table():
    lut = coco_object_lut("raw")
    # The published table: raw COCO id -> train id (+1 for things; ids above 90 -> 0).
    assert [lut[k] for k in (0, 10, 12, 24, 26, 27, 30, 43, 45, 64, 66, 69, 71, 81, 83, 89)] == [
        1, 11, 12, 24, 25, 26, 27, 40, 41, 60, 61, 62, 63, 73, 74, 80]
    assert lut[91] == 0 and lut[181] == 0 and lut[255] == 0
    assert lut[11] == 11  # ids that never occur are left as they are, as the published converter did
    things = [k for k in range(91) if k not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)]
    assert lut[things].tolist() == list(range(1, 81))


def _coco_stuff(root: Path, raw: bool) -> Path:
    for split, n in (("train2017", 1), ("val2017", 2)):
        for i in range(n):
            values = np.array([[0, 79, 80, 170], [255, 5, 100, 0]], dtype=np.uint8)
            name = f"{i:012d}.png" if raw else f"{i:012d}_labelTrainIds.png"
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(values).save(root / "annotations" / split / name)
    return root


def test_prepare_coco_object_command(tmp_path, capsys):
    root = _coco_stuff(tmp_path, raw=False)
    assert main(["prepare", "coco-object", str(root)]) == 0
    out = np.asarray(Image.open(root / "annotations/val2017/000000000001_instanceTrainIds.png"))
    assert out.tolist() == [[1, 80, 0, 0], [0, 6, 0, 1]]
    assert "wrote 3 label maps (0 existed already)" in capsys.readouterr().err
    assert not list(root.rglob("*.part"))
    assert main(["prepare", "coco-object", str(root)]) == 0
    assert "wrote 0 label maps (3 existed already)" in capsys.readouterr().err
    assert main(["prepare", "coco-object", str(root), "--overwrite"]) == 0
    assert "wrote 3 label maps" in capsys.readouterr().err
    # the result reads as the coco_object preset's labels
    preset = PRESETS["coco_object"]
    (root / preset.image_dir).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((2, 4, 3), dtype=np.uint8)).save(root / preset.image_dir / f"{i:012d}.jpg")
    data = SegmentationDataset(preset, root)
    assert len(data) == 2 and data.read_label(data.samples[0].label).max() == 80


def test_prepare_coco_object_from_raw_maps(tmp_path):
    root = _coco_stuff(tmp_path, raw=True)
    jobs = coco_object_jobs(root)
    assert {kind for *_, kind in jobs} == {"raw"} and len(jobs) == 3
    assert main(["prepare", "coco-object", str(root)]) == 0
    out = np.asarray(Image.open(root / "annotations/train2017/000000000000_instanceTrainIds.png"))
    assert out.tolist() == [[1, 71, 72, 0], [0, 6, 0, 1]]  # raw COCO ids 79, 80 are things 71, 72; 100, 170 stuff
