"""The segmenter: a method's dense CLIP features + sliding windows + text queries."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..classes import ClassList, make_class_list
from ..errors import ProxyCLIPError
from ..images import ImageInput, label_dtype, load_image, resize_keep_ratio
from ..text_cache import encode_cached
from . import clip as clip_lib
from .config import WEIGHT_FIELDS, ProxyCLIPConfig
from .hub import weights_available
from .methods import Windows, get_method
from .pixels import clip_input_constants, clip_to_vfm_input, normalise_clip_input
from .refine import REFINERS, refine_image_logits
from .sliding import slide_logits
from .vfm import VFM_BUILDERS

Classes = ClassList | Sequence[str | Sequence[str]]


@dataclass(frozen=True)
class Segmentation:
    """The result for one image, at the image's own size."""

    labels: np.ndarray  # H x W class indices: uint8 up to 256 classes, else int16/int32 (images.label_dtype)
    probs: np.ndarray | None  # C x H x W float32 class probabilities (max over a class's names); None if not asked
    classes: ClassList


class ProxyCLIP(nn.Module):
    """Training-free open-vocabulary segmentation with ProxyCLIP.

    Two levels: :meth:`segment` takes an image (path, PIL image or H x W x 3 uint8 array) and
    class names; :meth:`predict_logits` takes a CLIP-normalised tensor and text embeddings.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: object, vfm: nn.Module | None, config: ProxyCLIPConfig,
                 text_cache: OrderedDict | None = None):
        """``text_cache``: the cache of another ProxyCLIP with the same CLIP, to share its text embeddings."""
        super().__init__()
        if config.needs_vfm and vfm is None:
            raise ProxyCLIPError(f"method {config.method!r} needs a VFM: build with a VFM (ProxyCLIP.build does)")
        if config.refine is not None and config.refine not in REFINERS:
            raise ProxyCLIPError(f"unknown refinement {config.refine!r}; choose one of {', '.join(REFINERS) or 'none'}")
        self.clip_model = clip_model
        self.clip = clip_lib.ClipAdapter(clip_model)
        self.tokenizer = tokenizer
        self.vfm = vfm  # kept whatever the method, so with_config can switch methods back and forth
        self.config = config
        self.method = get_method(config.method).build(config.options)
        # query names -> Q x E float32 CPU embeddings, least recently used first (kept apart from the
        # model's device and dtype, so that .to() / .half() after encoding need nothing else)
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict() if text_cache is None else text_cache
        self.text_cache_size = 64  # class lists whose embeddings are kept (a server sees many)
        self.band_elements = 2**22  # at most this many logits resized at once in segment() (each band: ~6 copies)
        self.batch_elements = 2**28  # at most this many window logits per forward pass

    @classmethod
    def build(
        cls,
        config: ProxyCLIPConfig | None = None,
        *,
        clip_weights: str | None = None,
        vfm_weights: str | None = None,
        random_weights: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: Callable[[str], None] | None = None,
    ) -> ProxyCLIP:
        """Build from names, loading weights through open_clip and timm (or local files).

        Args:
            config: the configuration; defaults to CLIP ViT-B/16 (OpenAI) + DINO ViT-B/8, ProxyCLIP.
            clip_weights / vfm_weights: local checkpoint files instead of the hub.
            random_weights: random weights for tests and benchmarks; warns, output meaningless.
            device: e.g. "cpu", "cuda".
            dtype: torch.float32; torch.float16 as the published runs (open_clip's mixed precision
                for CLIP: fp16 weights, fp32 layer norms and embeddings; the VFM in fp16); or
                torch.bfloat16 (every weight cast: faster on CPUs with AVX512-BF16/AMX).
            progress: called with a line before each model is loaded (e.g. ``print``).

        Raises:
            WeightsError: naming every missing weight, before any is loaded (see :mod:`proxyclip.model.hub`).
        """
        config = config or ProxyCLIPConfig()
        if config.needs_vfm and config.vfm not in VFM_BUILDERS:
            raise ProxyCLIPError(f"unknown VFM {config.vfm!r}; choose one of {', '.join(VFM_BUILDERS)}")
        if random_weights:
            warnings.warn("ProxyCLIP built with RANDOM weights: its output is meaningless", stacklevel=2)
        say = progress or (lambda line: None)
        mixed = dtype == torch.float16  # the published recipe: open_clip builds CLIP in mixed precision
        with weights_available(config, clip_weights, vfm_weights, random_weights):  # all there, or one error
            say(f"loading CLIP {config.clip} ({'random weights' if random_weights else clip_weights or config.clip_pretrained})")
            clip_model, tokenizer = clip_lib.load_clip(config.clip, config.clip_pretrained, clip_weights,
                                                       random_weights, precision="fp16" if mixed else "fp32")
            vfm = None
            if config.needs_vfm:
                say(f"loading VFM {config.vfm} ({'random weights' if random_weights else vfm_weights or 'hub'})")
                vfm = VFM_BUILDERS[config.vfm](weights=vfm_weights, random_weights=random_weights).to(dtype)
        if not mixed:
            clip_model.to(dtype)
        return cls(clip_model, tokenizer, vfm, config).to(device)

    def astype(self, dtype: torch.dtype) -> ProxyCLIP:
        """A copy whose models run in ``dtype`` (e.g. torch.bfloat16), sharing the text cache."""
        vfm = None if self.vfm is None else copy.deepcopy(self.vfm)
        model = ProxyCLIP(copy.deepcopy(self.clip_model), self.tokenizer, vfm, self.config, self._text_cache)
        return model.to(self.device, dtype)

    def with_config(self, **changes) -> ProxyCLIP:
        """The same models with other inference settings: config fields (window, threshold, method,
        ...) or the method's options by name (e.g. ``beta``, ``gamma`` for ProxyCLIP)."""
        config = self.config.updated(**changes)
        for key in WEIGHT_FIELDS:
            if getattr(config, key) != getattr(self.config, key) and (key != "vfm" or config.needs_vfm):
                raise ProxyCLIPError(f"changing {key} needs new weights: build a new ProxyCLIP")
        if config.needs_vfm and self.vfm is None:
            raise ProxyCLIPError(f"method {config.method!r} needs a VFM, and this model was built without one: "
                                 "build a new ProxyCLIP with that method")
        # the text side does not depend on these settings: the clone shares the cache
        return ProxyCLIP(self.clip_model, self.tokenizer, self.vfm, config, self._text_cache).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.clip.visual.proj.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    # ---- text ---------------------------------------------------------------------------
    def _text_key(self, classes: Classes) -> tuple:
        """The text cache's key: the query names (and the method's extra templates, if any)."""
        queries = make_class_list(classes).queries
        extra = get_method(self.config.method).extra_templates
        return (queries, extra) if extra else queries

    def is_encoded(self, classes: Classes) -> bool:
        """Whether :meth:`encode_classes` has these names cached (it then costs nothing)."""
        return self._text_key(classes) in self._text_cache

    def encode_classes(self, classes: Classes, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Q x E unit-norm text embeddings of every query name, on the model's device and in its
        dtype; cached per list of names (and the method's templates), in memory and on disk
        (:mod:`proxyclip.text_cache`). ``progress(done, total)`` follows an encoding of names."""
        key = self._text_key(classes)
        cache = self._text_cache
        if key in cache:
            cache.move_to_end(key)
        else:
            queries = make_class_list(classes).queries
            extra = get_method(self.config.method).extra_templates
            cache[key] = encode_cached(self.clip_model, self.tokenizer, queries, self.device, progress,
                                       extra_templates=extra).float().cpu()
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return cache[key].to(self.device, self.dtype)

    # ---- tensor level -------------------------------------------------------------------
    def to_vfm_input(self, windows: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised windows -> the same pixels normalised for the VFM (padding included)."""
        clip_mean, clip_std = self.clip.normalisation
        return clip_to_vfm_input(windows, clip_mean, clip_std, self.vfm.mean, self.vfm.std)  # as published

    def window_features(self, windows: torch.Tensor) -> torch.Tensor:
        """Dense CLIP features of a batch of windows, by the configured method.

        Args:
            windows: N x 3 x h x w, CLIP-normalised, float32 (the VFM's input is made from them in
                float32, then cast, as in the published runs; CLIP gets them in its dtype).

        Returns:
            N x E x h' x w' unit-norm features on the method's grid (the VFM's, or CLIP's).
        """
        return F.normalize(self.method(self._windows(windows)), dim=1)  # N x E x h' x w'

    def _windows(self, windows: torch.Tensor) -> Windows:
        return Windows(source=windows, clip=self.clip, vfm=self.vfm, window=self.config.window,
                       to_vfm_input=self.to_vfm_input if self.vfm is not None else None)

    def window_logits(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """N x 3 x h x w windows -> N x Q x h x w cosine logits, resized to the window."""
        own_logits = getattr(self.method, "logits", None)  # a method that classifies its own way
        if own_logits is not None:
            logits = own_logits(self._windows(windows.float()), text)  # N x Q x h' x w'
        else:
            feats = self.window_features(windows.float())  # N x E x h' x w'
            logits = torch.einsum("nehw,qe->nqhw", feats, text.to(feats.dtype))  # N x Q x h' x w'
        return F.interpolate(logits, size=windows.shape[-2:], mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def predict_logits(
        self, image: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Sliding-window logits of one image.

        Args:
            image: 3 x H x W (or 1 x 3 x H x W) float, CLIP-normalised.
            text: Q x E text embeddings from :meth:`encode_classes`.
            out_size: (H0, W0) to resize the logits to (bilinear), e.g. the original size.

        Returns:
            Q x H0 x W0 float32 cosine logits (not scaled), averaged over windows.
        """
        if image.dim() == 4:
            if image.shape[0] != 1:
                raise ValueError("predict_logits takes one image; use predict_logits_batch for several")
            image = image[0]
        return self.predict_logits_batch([image], text, [out_size])[0]

    @torch.inference_mode()
    def predict_logits_batch(
        self,
        images: Sequence[torch.Tensor],
        text: torch.Tensor,
        out_sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`predict_logits` for several images, their windows sharing forward passes.

        Args:
            images: 3 x H_i x W_i CLIP-normalised tensors (sizes may differ).
            out_sizes: per image, the size to resize its logits to, or None.

        Returns:
            For each image, Q x H0_i x W0_i float32 logits; equal to one image at a time. A refinement
            (``config.refine``) runs on them at that size, with the image resized to it (as published).
        """
        cfg = self.config
        # Window logits are Q x window x window each: with a large vocabulary (ADE847) fewer windows
        # share a batch, so that the logits of one batch stay within ~1 GiB.
        per_window = text.shape[0] * cfg.window * cfg.window
        batch = max(1, min(cfg.window_batch, self.batch_elements // per_window))
        all_logits = slide_logits(
            [image.to(self.device) for image in images],
            lambda w: self.window_logits(w, text),
            num_outputs=text.shape[0],
            window=cfg.window,
            stride=cfg.stride,
            pad_multiple=cfg.pad_multiple,
            batch_size=batch,
        )  # [Q x H_i x W_i]
        out_sizes = out_sizes or [None] * len(images)
        out = []
        for image, logits, size in zip(images, all_logits, out_sizes):
            if size is not None and tuple(size) != tuple(logits.shape[-2:]):
                logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
            if cfg.refine is not None:
                logits = refine_image_logits(cfg.refine, image.to(self.device), logits)  # Q x H0 x W0
            out.append(logits)
        return out

    def classify(self, logits: torch.Tensor, classes: Classes,
                 keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine logits -> labels and class probabilities.

        Softmax of ``logit_scale * logits`` over the queries; a class's probability is the max
        over its names; with ``area_threshold``, classes 1.. that win too few pixels get probability 0
        (see :meth:`kept_classes`); argmax; pixels whose top probability is below ``bg_threshold`` get 0.

        Args:
            logits: Q x H x W.
            keep: C booleans, the classes :meth:`kept_classes` keeps (computed from ``logits`` if the
                area threshold is on and none are given: pass them when ``logits`` is part of an image).

        Returns:
            labels (H x W int64) and probabilities (C x H x W float32).
        """
        class_list = make_class_list(classes)
        probs = (logits.float() * self.config.logit_scale).softmax(dim=0)  # Q x H x W
        if len(class_list.queries) != len(class_list):
            bounds = np.cumsum([0] + [len(names) for names in class_list.names])
            probs = torch.stack([probs[a:b].amax(dim=0) for a, b in zip(bounds[:-1], bounds[1:])])  # C x H x W
        if keep is None and self.config.area_threshold > 0:
            keep = self.kept_classes(probs.argmax(dim=0).flatten().bincount(minlength=len(class_list)))
        if keep is not None:
            probs = probs * keep.to(probs.device, probs.dtype).view(-1, 1, 1)  # C x H x W
        top, labels = probs.max(dim=0)  # H x W each
        if self.config.bg_threshold > 0:
            labels[top < self.config.bg_threshold] = 0
        return labels, probs

    def kept_classes(self, areas: torch.Tensor) -> torch.Tensor:
        """SCLIP's area filter (``area_thd``, clip_segmentor.py ``postprocess_result``): class 0 and every
        class whose argmax area is more than ``area_threshold`` times the area of all classes but 0.

        Args:
            areas: C int64 pixel counts of the argmax of the class probabilities.

        Returns:
            C booleans.
        """
        keep = areas[1:] > self.config.area_threshold * areas[1:].sum()
        return torch.cat([keep.new_ones(1), keep])

    # ---- image level --------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """H x W x 3 uint8 RGB -> 3 x h x w CLIP-normalised float32 (resized by the config's rule, OpenCV
        INTER_LINEAR as mmcv; normalised with the published constants, :mod:`proxyclip.model.pixels`)."""
        cfg = self.config
        pixels = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)  # 3 x H x W uint8, not copied
        if cfg.short_side is not None:
            pixels = resize_keep_ratio(pixels, cfg.short_side, cfg.long_side)
        mean_255, std_255 = clip_input_constants(*self.clip.normalisation)
        return normalise_clip_input(pixels.to(self.device), mean_255, std_255)  # 3 x h x w, as published

    @torch.inference_mode()
    def segment(self, image: ImageInput, classes: Classes, return_probs: bool = False) -> Segmentation:
        """Segment one image into ``classes``.

        Args:
            image: a file path, a PIL image, or an H x W x 3 uint8 RGB array.
            classes: names in label order; an item may be a list of synonyms or "a; b".
            return_probs: also return the C x H x W float32 probabilities (memory: C x H x W x 4
                bytes, e.g. 10 GB for 847 classes on a 2000 x 1500 image).

        Returns:
            :class:`Segmentation` at the image's original size.
        """
        class_list = make_class_list(classes)
        pixels = load_image(image)
        text = self.encode_classes(class_list)
        refine_at = pixels.shape[:2] if self.config.refine else None  # a refinement runs at the original size
        logits = self.predict_logits(self.preprocess(pixels), text, refine_at)  # Q x h x w (resized) or H x W
        labels, probs = self.classify_at_size(logits, pixels.shape[:2], class_list, return_probs)
        return Segmentation(labels, probs, class_list)

    @torch.inference_mode()
    def segment_batch(
        self, images: Sequence[ImageInput], classes: Classes, return_probs: bool = False
    ) -> list[Segmentation]:
        """:meth:`segment` for several images, their windows sharing forward passes (the results
        equal one image at a time). Images are decoded one after another, so pass batches of a
        size that fits in memory (e.g. 8-32)."""
        class_list = make_class_list(classes)
        pixels = [load_image(image) for image in images]
        text = self.encode_classes(class_list)
        refine_at = [p.shape[:2] for p in pixels] if self.config.refine else None  # refined at the original size
        logits = self.predict_logits_batch([self.preprocess(p) for p in pixels], text, refine_at)  # [Q x h_i x w_i]
        out = []
        for image_pixels, image_logits in zip(pixels, logits):
            labels, probs = self.classify_at_size(image_logits, image_pixels.shape[:2], class_list, return_probs)
            out.append(Segmentation(labels, probs, class_list))
        return out

    def classify_at_size(
        self,
        logits: torch.Tensor,
        size: tuple[int, int],
        classes: Classes,
        return_probs: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Resize logits bilinearly to ``size`` and :meth:`classify` them, in bands of rows so that
        a large image never needs Q x H x W at once (same result as resizing all at once).

        Args:
            logits: Q x h x w cosine logits.
            size: (H, W), e.g. the original image's size.

        Returns:
            H x W labels (:func:`~proxyclip.images.label_dtype`: uint8 up to 256 classes), and C x H x W
            float32 probabilities if ``return_probs`` (else None).
        """
        class_list = make_class_list(classes)
        height, width = size
        labels = np.empty((height, width), dtype=label_dtype(len(class_list)))  # uint8 up to 256 classes
        probs = np.empty((len(class_list), height, width), dtype=np.float32) if return_probs else None
        rows = max(1, self.band_elements // max(1, logits.shape[0] * width))
        keep = None
        if self.config.area_threshold > 0:  # a first pass counts each class's argmax area over the image
            areas = torch.zeros(len(class_list), dtype=torch.int64, device=logits.device)
            for top in range(0, height, rows):
                band_probs = self.classify(resize_rows(logits, (height, width), top, min(top + rows, height)),
                                           class_list, keep=torch.ones(len(class_list), dtype=torch.bool))[1]
                areas += band_probs.argmax(dim=0).flatten().bincount(minlength=len(class_list))
            keep = self.kept_classes(areas)
        for top in range(0, height, rows):
            band = resize_rows(logits, (height, width), top, min(top + rows, height))  # Q x n x W
            band_labels, band_probs = self.classify(band, class_list, keep)
            labels[top : top + rows] = band_labels.cpu().numpy()
            if probs is not None:
                probs[:, top : top + rows] = band_probs.cpu().numpy()
        return labels, probs


def resize_rows(logits: torch.Tensor, size: tuple[int, int], top: int, bottom: int) -> torch.Tensor:
    """Rows ``top:bottom`` of ``F.interpolate(logits, size, mode="bilinear", align_corners=False)``.

    Bilinear resizing is separable: resize the width of the source rows this band falls between
    (only those), then blend the two source rows of each output row, with PyTorch's own
    coordinate rule.

    Args:
        logits: Q x h x w.

    Returns:
        Q x (bottom - top) x W.
    """
    height, width = size
    src_h = logits.shape[1]
    scale = src_h / height
    y = torch.arange(top, bottom, device=logits.device, dtype=torch.float32)
    src = (scale * (y + 0.5) - 0.5).clamp(min=0)  # n source coordinates, float32 as PyTorch
    y0 = src.floor().long().clamp(max=src_h - 1)
    y1 = (y0 + 1).clamp(max=src_h - 1)
    frac = (src - y0).to(logits.dtype).view(1, -1, 1)  # 1 x n x 1
    lo, hi = int(y0[0]), int(y1[-1]) + 1  # the band's source rows (coordinates grow with y)
    rows = logits[None, :, lo:hi]  # 1 x Q x (hi - lo) x w
    wide = F.interpolate(rows, size=(hi - lo, width), mode="bilinear", align_corners=False)[0]  # Q x (hi-lo) x W
    y0, y1 = y0 - lo, y1 - lo
    return wide[:, y0] * (1 - frac) + wide[:, y1] * frac  # Q x n x W
