"""The configuration of a segmenter: which weights, which method, which inference settings.

Every default is written here once (the method's own settings in its options class, see
:mod:`proxyclip.model.methods`); the command line, demo, evaluation and bench read them from here.
This module is light to import (no torch), so that ``proxyclip --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import ProxyCLIPError
from .methods import METHODS, get_method

# The CLIP models of the paper: open_clip name -> its pretrained tag in the paper.
CLIP_MODELS = {
    "ViT-B-16": "openai",
    "ViT-L-14": "openai",
    "ViT-H-14": "laion2b_s32b_b79k",
}


def default_pretrained(name: str, tag: str | None = None) -> str:
    """``tag``, or else the paper's pretrained tag for the CLIP ``name`` (OpenAI's for other names)."""
    return tag if tag is not None else CLIP_MODELS.get(name, "openai")


# Fields of ProxyCLIPConfig that identify the weights; the rest are inference settings.
WEIGHT_FIELDS = ("clip", "clip_pretrained", "vfm")


@dataclass(frozen=True)
class ProxyCLIPConfig:
    """Everything that decides the output for a given set of weights.

    ``clip``, ``clip_pretrained`` and ``vfm`` identify the weights (:data:`WEIGHT_FIELDS`); the other
    fields are inference settings, which :meth:`ProxyCLIP.with_config` changes on the same weights.
    """

    clip: str = "ViT-B-16"  # open_clip architecture
    clip_pretrained: str | None = None  # open_clip tag ("openai" implies QuickGELU); None: the paper's for `clip`
    vfm: str = "dino_vitb8"  # key of VFM_BUILDERS (built only for methods that need a VFM)
    method: str = "proxyclip"  # key of METHODS
    options: Any = None  # the method's options (a frozen dataclass); None: its published defaults
    window: int = 336  # sliding-window size (pixels, after resizing)
    stride: int = 112  # sliding-window stride
    pad_multiple: int = 56  # windows smaller than `window` are padded to a multiple of this
    logit_scale: float = 40.0  # multiplies the cosine logits before the softmax over queries
    bg_threshold: float = 0.0  # pixels whose top probability is below become class 0
    area_threshold: float = 0.0  # classes 1.. predicted on at most this fraction of the non-class-0 pixels are dropped (SCLIP's area_thd)
    short_side: int | None = 336  # resize so the short side is this (None: no resizing) ...
    long_side: int = 2048  # ... unless the long side would exceed this
    refine: str | None = None  # post-processing of each image's logits: a key of REFINERS, e.g. "pamr"
    window_batch: int = 16  # most windows per forward pass (memory, not results)

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        object.__setattr__(self, "clip_pretrained", default_pretrained(self.clip, self.clip_pretrained))
        if self.refine in ("", "none"):  # the command line's way to turn a method's refinement off
            object.__setattr__(self, "refine", None)
        if self.options is None:
            object.__setattr__(self, "options", spec.default_options())
        elif not isinstance(self.options, spec.options):
            raise ProxyCLIPError(f"method {self.method!r} takes options of type {spec.options.__name__}, "
                                 f"not {type(self.options).__name__}")
        if self.window <= 0 or self.stride <= 0 or self.window_batch <= 0 or self.pad_multiple <= 0:
            raise ProxyCLIPError("window, stride, pad multiple and window batch must be positive integers")
        if self.stride > self.window:
            raise ProxyCLIPError(f"stride {self.stride} is larger than the window {self.window}: pixels would be skipped")
        if not 0.0 <= self.bg_threshold <= 1.0:
            raise ProxyCLIPError(f"background threshold {self.bg_threshold} must lie in [0, 1]")
        if not 0.0 <= self.area_threshold <= 1.0:
            raise ProxyCLIPError(f"area threshold {self.area_threshold} must lie in [0, 1]")
        if self.short_side is not None and (self.short_side <= 0 or self.long_side <= 0):
            raise ProxyCLIPError("short and long side must be positive")
        if self.logit_scale <= 0:
            raise ProxyCLIPError(f"logit scale {self.logit_scale} must be positive")

    @classmethod
    def create(cls, **settings: Any) -> ProxyCLIPConfig:
        """A config from flat settings: config fields, and the method's option names (e.g. ``beta``)."""
        return cls().updated(**settings)

    @property
    def needs_vfm(self) -> bool:
        return get_method(self.method).needs_vfm

    def weights(self) -> dict[str, Any]:
        """What identifies the weights (the VFM only where the method uses one)."""
        return {"clip": self.clip, "clip_pretrained": self.clip_pretrained, "vfm": self.vfm if self.needs_vfm else None}

    def updated(self, **changes: Any) -> ProxyCLIPConfig:
        """A copy with ``changes``: config fields, or option names of the (new) method.

        Switching ``method`` starts from the new method's default options, and a shared setting
        still at the old method's default (e.g. its logit scale) takes the new method's.
        """
        config_keys = {f.name for f in fields(self)}
        direct = {k: v for k, v in changes.items() if k in config_keys}
        option_changes = {k: v for k, v in changes.items() if k not in config_keys}
        method = direct.get("method", self.method)
        spec = get_method(method)
        if method != self.method:
            old = _method_defaults(self.method)
            new = _method_defaults(method)
            for key, value in new.items():
                if key not in direct and getattr(self, key) == old[key]:
                    direct[key] = value
            if "options" not in direct:
                direct["options"] = spec.default_options()
        if option_changes:
            unknown = sorted(set(option_changes) - set(spec.option_names()))
            if unknown:
                raise ProxyCLIPError(f"unknown setting(s) {', '.join(unknown)} for method {method!r}; it takes "
                                     f"{', '.join(spec.option_names()) or 'no options'} besides the general settings")
            base = direct.get("options", self.options if method == self.method else spec.default_options())
            direct["options"] = replace(base, **option_changes)
        return replace(self, **direct)

    def settings(self) -> dict[str, Any]:
        """Every inference setting, flat (method options by name), for records and labels."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("options", "window_batch")}
        out.update({f.name: getattr(self.options, f.name) for f in fields(self.options)})
        return out


def _method_defaults(method: str) -> dict[str, Any]:
    """The general settings a method's published runs use: the global defaults under its own."""
    base = {f.name: f.default for f in fields(ProxyCLIPConfig) if f.name not in WEIGHT_FIELDS + ("method", "options")}
    return {**base, **get_method(method).settings}


def method_defaults(method: str) -> dict[str, Any]:
    """General settings and options of ``method`` at their defaults, flat."""
    spec = get_method(method)
    options = spec.default_options()
    return {**_method_defaults(method), **{f.name: getattr(options, f.name) for f in fields(options)}}


__all__ = ["CLIP_MODELS", "METHODS", "WEIGHT_FIELDS", "ProxyCLIPConfig", "default_pretrained", "method_defaults"]
