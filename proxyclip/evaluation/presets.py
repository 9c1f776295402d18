"""Per-dataset evaluation presets: the published protocol of each benchmark, as data.

A :class:`DatasetPreset` says where a prepared dataset keeps its images and labels, how labels
map to class indices, which class names are queried and with which method settings (background
threshold, resize rule, sliding window). ``PRESETS`` holds the ten benchmarks of the paper
(see REPRODUCTION.md); :func:`preset_to_json` / :func:`load_preset` let a user copy one into a
JSON file, edit it and evaluate their own dataset without writing code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..classes import ClassList, read_class_file
from ..errors import ProxyCLIPError
from ..model.config import ProxyCLIPConfig

# The inference settings a dataset's protocol decides (the rest belongs to the method or the user).
DATASET_SETTINGS = ("window", "stride", "short_side", "long_side", "bg_threshold", "logit_scale", "area_threshold")

LABEL_DTYPES = ("uint8", "uint16")
PROTOCOLS = ("method", "dataset")  # whose per-dataset settings win: the method's published ones, or the preset's


@dataclass(frozen=True)
class DatasetPreset:
    """Everything that decides how one dataset is read and scored."""

    key: str  # name on the command line, e.g. "voc21"
    title: str  # column title in result tables, e.g. "VOC21"
    classes_file: str  # class-names file: a name in proxyclip/data/classnames/ or a path
    num_classes: int  # C: class indices 0..C-1 after the label mapping
    image_dir: str  # folders relative to the dataset root
    label_dir: str
    image_suffix: str = ".jpg"  # an image is IMAGE_DIR/<id><image_suffix> ...
    label_suffix: str = ".png"  # ... its label LABEL_DIR/<id><label_suffix>
    split_file: str | None = None  # list of ids relative to the root; None: every image under image_dir
    reduce_zero_label: bool = False  # label 0 becomes ignore, the others shift down by one
    ignore_index: int = 255  # label value left out of scoring
    published_ignore_index: int | None = None  # the published runs' ignore value, where it was wrong
    label_dtype: str = "uint8"  # labels are cast to this on loading (as MMSegmentation did)
    # The published protocol's inference settings where they differ from ProxyCLIPConfig's defaults:
    # a partial config, e.g. {"bg_threshold": 0.2} or {"short_side": 448, "window": 224}.
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ProxyCLIPError(f"preset {self.key!r}: num_classes must be at least 1")
        if self.label_dtype not in LABEL_DTYPES:
            raise ProxyCLIPError(f"preset {self.key!r}: label_dtype must be one of {', '.join(LABEL_DTYPES)}")
        unknown = sorted(set(self.settings) - set(DATASET_SETTINGS))
        if unknown:
            raise ProxyCLIPError(f"preset {self.key!r}: unknown setting(s) {', '.join(unknown)}; a preset sets "
                                 f"{', '.join(DATASET_SETTINGS)}")
        try:  # the config checks the values
            ProxyCLIPConfig.create(**self.settings)
        except ProxyCLIPError as exc:
            raise ProxyCLIPError(f"preset {self.key!r}: {exc}") from None

    def setting(self, name: str) -> Any:
        """The protocol's value of an inference setting (the config's default where the preset sets none)."""
        return self.settings.get(name, getattr(ProxyCLIPConfig(), name))

    def ignore(self, published: bool = False) -> int:
        """The ignore value: the correct one, or (``published``) the one the published runs used."""
        if published and self.published_ignore_index is not None:
            return self.published_ignore_index
        return self.ignore_index

    def classes_path(self) -> Path:
        """The class-names file: a path as given, else a file shipped in proxyclip/data/classnames/."""
        path = Path(self.classes_file).expanduser()
        if path.is_absolute():
            return path
        shipped = Path(str(resources.files("proxyclip") / "data" / "classnames" / self.classes_file))
        return shipped if shipped.is_file() else path

    def class_list(self) -> ClassList:
        """The classes in label order, names read as the published evaluation did (a name may repeat
        across classes, see :func:`proxyclip.classes.make_class_list`), checked against num_classes."""
        classes = read_class_file(self.classes_path(), unique=False)
        if len(classes) != self.num_classes:
            raise ProxyCLIPError(
                f"preset {self.key!r}: {self.classes_path()} names {len(classes)} classes but num_classes is "
                f"{self.num_classes}; the file needs one line per class index"
            )
        return classes

    def display_names(self, classes: ClassList) -> tuple[str, ...]:
        """Names for tables and legends: with a background threshold, class 0 is queried with a bag
        of background words (VOC21, COCO-Object) or "background", and is shown as "background"."""
        names = list(classes.display_names)
        if self.setting("bg_threshold") > 0:
            names[0] = "background"
        return tuple(names)


_VOC = dict(image_dir="JPEGImages", label_dir="SegmentationClass", split_file="ImageSets/Segmentation/val.txt")
_CONTEXT = dict(image_dir="JPEGImages", label_dir="SegmentationClassContext",
                split_file="ImageSets/SegmentationContext/val.txt")

PRESETS: dict[str, DatasetPreset] = {p.key: p for p in (
    # Roots: VOCdevkit/VOC2012 (voc21, voc20), VOCdevkit/VOC2010 (context60, context59, context459),
    # coco_stuff164k (coco_object, coco_stuff), cityscapes, ADEChallengeData2016, ADE20K_2021_17_01.
    DatasetPreset("voc21", "VOC21", "voc21.txt", 21, settings={"bg_threshold": 0.2}, **_VOC),
    DatasetPreset("voc20", "VOC20", "voc20.txt", 20, reduce_zero_label=True, **_VOC),
    DatasetPreset("context60", "Context60", "context60.txt", 60, settings={"bg_threshold": 0.15}, **_CONTEXT),
    DatasetPreset("context59", "Context59", "context59.txt", 59, reduce_zero_label=True, **_CONTEXT),
    DatasetPreset("coco_object", "Object", "coco_object.txt", 81, settings={"bg_threshold": 0.25},
                  image_dir="images/val2017", label_dir="annotations/val2017", label_suffix="_instanceTrainIds.png"),
    DatasetPreset("coco_stuff", "Stuff", "coco_stuff.txt", 171,
                  image_dir="images/val2017", label_dir="annotations/val2017", label_suffix="_labelTrainIds.png"),
    DatasetPreset("cityscapes", "City", "cityscapes.txt", 19,
                  settings={"short_side": 448, "window": 224, "stride": 112},
                  image_dir="leftImg8bit/val", label_dir="gtFine/val",
                  image_suffix="_leftImg8bit.png", label_suffix="_gtFine_labelTrainIds.png"),
    DatasetPreset("ade20k", "ADE", "ade20k.txt", 150, settings={"short_side": 448}, reduce_zero_label=True,
                  image_dir="images/validation", label_dir="annotations/validation"),
    DatasetPreset("ade847", "ADE847", "ade847.txt", 847, settings={"short_side": 448}, label_dtype="uint16",
                  ignore_index=65535, published_ignore_index=255,
                  image_dir="images_detectron2/validation", label_dir="annotations_detectron2/validation",
                  label_suffix=".tif"),
    DatasetPreset("context459", "Context459", "context459.txt", 459, settings={"short_side": 448}, label_dtype="uint16",
                  ignore_index=65535, published_ignore_index=255,
                  image_dir="JPEGImages", label_dir="annotations_detectron2/pc459_val", label_suffix=".tif",
                  split_file="ImageSets/SegmentationContext/val.txt"),
)}

# Table 1 of the paper: eight benchmarks and their average, then the two large vocabularies.
TABLE1_MAIN = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
TABLE1_LARGE = ("ade847", "context459")

# The folder each preset's root usually is, for error messages and the README.
TYPICAL_ROOTS = {
    "voc21": "VOCdevkit/VOC2012", "voc20": "VOCdevkit/VOC2012",
    "context60": "VOCdevkit/VOC2010", "context59": "VOCdevkit/VOC2010", "context459": "VOCdevkit/VOC2010",
    "coco_object": "coco_stuff164k", "coco_stuff": "coco_stuff164k",
    "cityscapes": "cityscapes", "ade20k": "ADEChallengeData2016", "ade847": "ADE20K_2021_17_01",
}


def get_preset(key: str) -> DatasetPreset:
    """The preset named ``key`` (case-insensitive; "-" and "_" alike)."""
    norm = key.strip().lower().replace("-", "_")
    if norm not in PRESETS:
        raise ProxyCLIPError(f"unknown dataset {key!r}; choose one of {', '.join(PRESETS)}, or a preset JSON file")
    return PRESETS[norm]


def preset_to_json(preset: DatasetPreset) -> str:
    """The preset as JSON, every field written out, ready to copy and edit."""
    return json.dumps(asdict(preset), indent=2) + "\n"


def load_preset(path: str | Path) -> DatasetPreset:
    """Read a preset JSON file (as written by :func:`preset_to_json`).

    Fields left out take the defaults of :class:`DatasetPreset`; a relative ``classes_file``
    is looked up next to the JSON file first, then among the shipped class-name files.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProxyCLIPError(f"cannot read preset file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProxyCLIPError(f"preset file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProxyCLIPError(f"preset file {path} must hold a JSON object of DatasetPreset fields")
    known = {f.name for f in fields(DatasetPreset)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProxyCLIPError(f"preset file {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = [n for n in ("key", "classes_file", "num_classes", "image_dir", "label_dir") if n not in data]
    if missing:
        raise ProxyCLIPError(f"preset file {path}: missing field(s) {', '.join(missing)}")
    data.setdefault("title", data["key"])
    try:
        preset = DatasetPreset(**data)
    except TypeError as exc:
        raise ProxyCLIPError(f"preset file {path}: {exc}") from None
    local = path.parent / preset.classes_file
    if not Path(preset.classes_file).is_absolute() and local.exists():
        preset = replace(preset, classes_file=str(local))
    return preset
