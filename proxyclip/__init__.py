"""ProxyCLIP: training-free open-vocabulary semantic segmentation (ECCV 2024).

    >>> from proxyclip import ProxyCLIP
    >>> model = ProxyCLIP.build()                      # CLIP ViT-B/16 (OpenAI) + DINO ViT-B/8
    >>> result = model.segment("photo.jpg", ["cat; kitten", "dog", "grass", "sky"])
    >>> result.labels                                  # H x W class indices
"""

from .classes import ClassList, make_class_list, parse_classes, read_class_file
from .errors import ProxyCLIPError
from .model.clip import CLIP_MODELS
from .model.segmenter import ProxyCLIP, ProxyCLIPConfig, Segmentation
from .model.vfm import VFM_BUILDERS

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
