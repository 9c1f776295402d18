"""The methods: each one module of this package, registered in ``METHODS`` when it is imported.

Adding a method is one new file here (or anywhere, calling :func:`register_method`) plus its
tests: the segmenter, ``proxyclip segment``/``eval``/``bench`` and the demo list the methods,
their options, help texts and defaults from ``METHODS`` alone.

A method (see :mod:`.base`) maps a batch of windows to dense patch embeddings. It gets CLIP
through the adapter (:class:`proxyclip.model.clip.ClipAdapter`), which exposes every block, so a
method may change the last block only (MaskCLIP, SCLIP, ClearCLIP, NACLIP) or run a path of its
own through several blocks (GEM's self-self path, CLIPSurgery's dual path: ``clip.embed``, then
``clip.blocks(x, stop=k)``, then its own loop over ``clip.block(i)``).

Two optional hooks, for methods whose published inference reaches beyond the image embeddings:

- **Its own classification**: a built method may have a ``logits(windows, text) -> N x Q x h x w``
  attribute (``text``: the Q x E unit-norm text embeddings); the segmenter then calls it instead of
  taking the cosine of the normalised embeddings with the text. CLIPSurgery's feature surgery,
  which needs the class token and all class names at once, is one.
- **Its own prompts**: ``MethodSpec.extra_templates`` are added to the 80 OpenAI ImageNet templates
  when the segmenter embeds class names (CLIPSurgery's 5 scene prompts); the text cache keys on them.

Where what comes next plugs in, without a redesign (the first and third are not built yet):

- **A second VFM or other models** (CorrCLIP's SAM masks, region proposals): the spec will say
  what it needs (as ``needs_vfm`` does today); the segmenter builds the model once and hands it
  over in :class:`.base.Windows`, next to ``vfm``, with a lazily computed, cached product like
  ``vfm_features()`` (e.g. ``masks()``). Masks depend on the window only, so they batch like
  features.
- **Post-processing refinement** (PAMR, as SCLIP's and NACLIP's published rows use): a function
  in ``proxyclip.model.refine.REFINERS`` applied by the segmenter to each image's averaged logits
  at the output size with the image's pixels, as published (``ProxyCLIPConfig.refine``), for any
  method; a method's published runs turn it on through ``MethodSpec.settings`` (NACLIP).
- **Several scales or a splice of windows** (Trident): a built method will offer
  ``image_logits(segmenter, image, text)``, which the segmenter calls for the whole image instead
  of its sliding windows (as it calls ``logits`` today), and which uses the window machinery
  (:func:`proxyclip.model.sliding.slide_logits`) at the scales it wants.
- **Per-dataset published settings** (a method's own background thresholds, logit scale):
  ``MethodSpec.settings`` and ``dataset_settings``, partial inference configs that evaluation
  applies over the dataset preset.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import MethodSpec, Windows, option_help

METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to ``METHODS`` (a later spec of the same name replaces the earlier)."""
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    from ...errors import ProxyCLIPError

    try:
        return METHODS[name]
    except KeyError:
        raise ProxyCLIPError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "MethodSpec", "Windows", "get_method", "option_help", "register_method"]
