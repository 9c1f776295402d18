"""Readers for prepared segmentation datasets (MMSegmentation's and CAT-Seg's layouts).

A dataset is a root folder, a :class:`~proxyclip.presets.DatasetPreset` saying where images and
labels lie under it, and the label mapping. Samples are listed as MMSegmentation lists them:
from the preset's split file in its order, or else every image under the image folder (searched
recursively) sorted by path. Labels are read with Pillow as stored (palette indices, 8/16-bit
gray, 16-bit TIFF), cast to the preset's label dtype and, for ``reduce_zero_label``, mapped
0 -> 255 and c -> c - 1 (255 stays 255), as MMSegmentation's ``LoadAnnotations`` does.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..classes import ClassList
from ..errors import ProxyCLIPError
from .presets import TYPICAL_ROOTS, DatasetPreset


class DatasetError(ProxyCLIPError):
    """A dataset root, split file, image or label is missing or unreadable."""


@dataclass(frozen=True)
class Sample:
    """One image and its label map."""

    id: str  # path of the image relative to the image folder, without the suffix
    image: Path
    label: Path


def describe_layout(preset: DatasetPreset) -> str:
    """The expected layout in one line, e.g. for error messages."""
    def under_root(folder: str) -> str:
        return folder if Path(folder).is_absolute() else f"ROOT/{folder}"

    parts = [f"{under_root(preset.image_dir)}/ID{preset.image_suffix}", f"{under_root(preset.label_dir)}/ID{preset.label_suffix}"]
    if preset.split_file:
        parts.append(f"ids listed in ROOT/{preset.split_file}")
    where = f" (ROOT is usually {TYPICAL_ROOTS[preset.key]})" if preset.key in TYPICAL_ROOTS else ""
    return f"expected the {preset.key} layout: {', '.join(parts)}{where}"


def list_samples(preset: DatasetPreset, root: str | Path, split_file: str | Path | None = None) -> list[Sample]:
    """The samples of a dataset, checked to exist.

    Args:
        preset: layout and suffixes.
        root: the dataset root.
        split_file: a list of ids overriding the preset's (absolute, or relative to the root).

    Raises:
        DatasetError: naming the first missing folder, list or file and the expected layout.
    """
    root = Path(root).expanduser()
    layout = describe_layout(preset)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder; {layout}")
    image_dir, label_dir = root / preset.image_dir, root / preset.label_dir
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such folder; {layout}")
    split = split_file if split_file is not None else preset.split_file
    if split:
        split_path = Path(split) if Path(split).is_absolute() else root / split
        try:
            lines = split_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DatasetError(f"{split_path}: no such split file; {layout}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read split file {split_path}: {exc}") from None
        ids = [line.strip() for line in lines if line.strip()]
    else:
        ids = sorted(_scan(image_dir, preset.image_suffix), key=lambda i: i + preset.image_suffix)  # by path
    if not ids:
        where = f"listed in {split}" if split else f"*{preset.image_suffix} found under {image_dir}"
        raise DatasetError(f"no images {where}; {layout}")
    samples = [Sample(i, image_dir / f"{i}{preset.image_suffix}", label_dir / f"{i}{preset.label_suffix}") for i in ids]
    for kind in ("image", "label"):
        missing = [getattr(s, kind) for s in samples if not getattr(s, kind).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more of {len(samples)})" if len(missing) > 1 else ""
            raise DatasetError(f"{missing[0]}: no such {kind} file{more}; {layout}")
    return samples


def _scan(folder: Path, suffix: str) -> list[str]:
    """Ids of the files under ``folder`` (recursively) whose names end with ``suffix``."""
    ids = []
    for dirpath, _, files in os.walk(folder, followlinks=True):
        rel = Path(dirpath).relative_to(folder)
        ids += [(rel / f[: -len(suffix)]).as_posix() for f in files if f.endswith(suffix) and len(f) > len(suffix)]
    return ids


def read_label(path: str | Path, dtype: str = "uint8", reduce_zero_label: bool = False) -> np.ndarray:
    """Read a label map as MMSegmentation's ``LoadAnnotations`` does.

    Args:
        path: a single-channel PNG (palette or gray, 8 or 16 bit) or TIFF.
        dtype: "uint8" or "uint16": the values must fit; they are cast to it first.
        reduce_zero_label: 0 -> 255 (ignore), c -> c - 1, 255 stays 255.

    Returns:
        H x W int64 labels.

    Raises:
        DatasetError: unreadable, multi-channel, or values that do not fit ``dtype``.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
                raise DatasetError(
                    f"{path}: a label map must be one channel of class indices (palette or grayscale), got mode {img.mode}"
                )
            raw = np.asarray(img)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such label file") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise DatasetError(f"{path}: cannot read the label map ({exc})") from None
    labels = raw.astype(np.int64)
    top = np.iinfo(dtype).max
    if labels.size and (labels.min() < 0 or labels.max() > top):
        raise DatasetError(
            f"{path}: label values {labels.min()}..{labels.max()} do not fit {dtype}; use a preset with label_dtype uint16"
        )
    if reduce_zero_label:
        zero_or_ignore = (labels == 0) | (labels == 255)
        labels = labels - 1
        labels[zero_or_ignore] = 255
    return labels


class SegmentationDataset:
    """A prepared dataset on disk: samples, classes and the label mapping of a preset."""

    def __init__(self, preset: DatasetPreset, root: str | Path, *, published_ignore: bool = False,
                 split_file: str | Path | None = None) -> None:
        """
        Args:
            preset: the dataset's preset.
            root: the dataset root folder.
            published_ignore: score with the published runs' ignore value (ADE847 / PC459: 255).
            split_file: a list of ids to use instead of the preset's.
        """
        self.preset = preset
        self.root = Path(root).expanduser()
        self.classes: ClassList = preset.class_list()
        self.ignore_index = preset.ignore(published_ignore)
        self.published_ignore = published_ignore and preset.published_ignore_index is not None
        self.samples = list_samples(preset, self.root, split_file)

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: str | Path) -> np.ndarray:
        """H x W int64 labels of one sample, mapped as the preset says."""
        return read_label(path, self.preset.label_dtype, self.preset.reduce_zero_label)

    def ids_digest(self) -> str:
        """A short hash of the sample ids in order (part of a run's fingerprint)."""
        return hashlib.sha256("\n".join(s.id for s in self.samples).encode()).hexdigest()[:16]


# ---- COCO-Stuff -> COCO-Object ------------------------------------------------------------------

# COCO-Stuff's 80 thing classes among its raw 0-based ids 0..90 (the rest of 0..90 never occur).
_COCO_THING_IDS = (*range(0, 11), *range(12, 25), 26, 27, *range(30, 44), *range(45, 65), 66, 69,
                   *range(71, 82), *range(83, 90))


def coco_object_lut(source: str) -> np.ndarray:
    """256-entry uint8 table mapping COCO-Stuff labels to COCO-Object labels.

    ``source`` "train_ids": labels from ``*_labelTrainIds.png`` (0..170, 255 unlabeled): things
    0..79 become 1..80, stuff and 255 become 0. ``source`` "raw": the original COCO-Stuff maps
    (0-based COCO ids, 255 unlabeled), mapped as the published converter (GroupViT's
    ``cvt_coco_object.py``) did: things 1..80, ids above 90 (stuff, 255) 0, other values kept.
    """
    if source == "train_ids":
        lut = np.zeros(256, dtype=np.uint8)
        lut[:80] = np.arange(1, 81)
    elif source == "raw":
        lut = np.arange(256, dtype=np.uint8)
        lut[91:] = 0
        lut[list(_COCO_THING_IDS)] = np.arange(1, 81)
    else:
        raise ValueError(f"source must be 'train_ids' or 'raw', not {source!r}")
    return lut


def coco_object_jobs(root: str | Path) -> list[tuple[Path, Path, str]]:
    """(source label, target label, source kind) for every COCO-Stuff label under ROOT/annotations.

    Uses ``*_labelTrainIds.png`` where a split has them, else the raw ``*.png`` maps; targets
    are ``*_instanceTrainIds.png`` next to them (the coco_object preset's labels).
    """
    root = Path(root).expanduser()
    layout = ("expected a prepared COCO-Stuff 164k root: ROOT/annotations/{train2017,val2017}/*_labelTrainIds.png "
              "(or the raw *.png maps) and ROOT/images/{train2017,val2017}/*.jpg")
    ann = root / "annotations"
    if not ann.is_dir():
        raise DatasetError(f"{ann}: no such folder; {layout}")
    jobs: list[tuple[Path, Path, str]] = []
    for split in ("train2017", "val2017"):
        folder = ann / split
        if not folder.is_dir():
            continue
        names = sorted(p.name for p in folder.iterdir() if p.suffix == ".png")
        train_ids = [n for n in names if n.endswith("_labelTrainIds.png")]
        if train_ids:
            jobs += [(folder / n, folder / n.replace("_labelTrainIds.png", "_instanceTrainIds.png"), "train_ids")
                     for n in train_ids]
        else:
            jobs += [(folder / n, folder / (n[:-4] + "_instanceTrainIds.png"), "raw") for n in names if "TrainIds" not in n]
    if not jobs:
        raise DatasetError(f"no COCO-Stuff label maps found under {ann}; {layout}")
    return jobs


def convert_coco_object_label(source: Path, target: Path, kind: str) -> None:
    """Write one COCO-Object label map (8-bit gray PNG), atomically."""
    from ..images import write_atomically

    labels = read_label(source, "uint8")  # H x W int64, 0..255
    write_atomically({target: Image.fromarray(coco_object_lut(kind)[labels])})
