"""ProxyCLIP: training-free open-vocabulary semantic segmentation (ECCV 2024).

    >>> from proxyclip import ProxyCLIP
    >>> model = ProxyCLIP.build()                      # CLIP ViT-B/16 (OpenAI) + DINO ViT-B/8
    >>> result = model.segment("photo.jpg", ["cat; kitten", "dog", "grass", "sky"])
    >>> result.labels                                  # H x W class indices

The names below are imported on first use, so that ``import proxyclip`` (and ``proxyclip --help``)
does not load torch, open_clip and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_LAZY = {
    "ClassList": ".classes",
    "make_class_list": ".classes",
    "parse_classes": ".classes",
    "read_class_file": ".classes",
    "ProxyCLIPError": ".errors",
    "CLIP_MODELS": ".model.catalog",
    "ProxyCLIP": ".model.segmenter",
    "ProxyCLIPConfig": ".model.segmenter",
    "Segmentation": ".model.segmenter",
    "VFM_BUILDERS": ".model.vfm",
}

if TYPE_CHECKING:
    from .classes import ClassList, make_class_list, parse_classes, read_class_file
    from .errors import ProxyCLIPError
    from .model.catalog import CLIP_MODELS
    from .model.segmenter import ProxyCLIP, ProxyCLIPConfig, Segmentation
    from .model.vfm import VFM_BUILDERS


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'proxyclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CLIP_MODELS",
    "VFM_BUILDERS",
    "ClassList",
    "ProxyCLIP",
    "ProxyCLIPConfig",
    "ProxyCLIPError",
    "Segmentation",
    "make_class_list",
    "parse_classes",
    "read_class_file",
]
__version__ = "0.1.0"
