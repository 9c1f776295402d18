"""ProxyCLIP: training-free open-vocabulary semantic segmentation (ECCV 2024).

    >>> from proxyclip import ProxyCLIP
    >>> model = ProxyCLIP.build()                      # CLIP ViT-B/16 (OpenAI) + DINO ViT-B/8
    >>> result = model.segment("photo.jpg", ["cat; kitten", "dog", "grass", "sky"])
    >>> result.labels                                  # H x W class indices

The names below are imported on first use (PEP 562), so that ``import proxyclip`` and the
command line's ``--help`` do not import torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CLIP_MODELS": "proxyclip.model.config",
    "METHODS": "proxyclip.model.methods",
    "ProxyCLIPConfig": "proxyclip.model.config",
    "register_method": "proxyclip.model.methods",
    "VFM_BUILDERS": "proxyclip.model.vfm",
    "ProxyCLIP": "proxyclip.model.segmenter",
    "Segmentation": "proxyclip.model.segmenter",
    "ProxyCLIPError": "proxyclip.errors",
    "ClassList": "proxyclip.classes",
    "make_class_list": "proxyclip.classes",
    "parse_classes": "proxyclip.classes",
    "read_class_file": "proxyclip.classes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'proxyclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
