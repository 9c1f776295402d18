"""What a method is: a spec (name, options with published defaults, needs) and a builder.

A method turns a batch of windows into dense patch embeddings in CLIP's joint space. It reads
what it needs through :class:`Windows`: the CLIP-normalised pixels, the CLIP adapter
(:class:`proxyclip.model.clip.ClipAdapter`, the only door to open_clip's internals: embedding,
blocks, a block's q/k/v, out_proj, MLP, ln_post, proj) and, for methods that use one, the VFM and
its features. Everything else (text, sliding windows, logits, classification) is the segmenter's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from ..._lazy import F

if TYPE_CHECKING:
    import torch

    from ..clip import ClipAdapter


class Method(Protocol):
    """A built method: windows in, dense embeddings out."""

    def __call__(self, windows: Windows) -> torch.Tensor:
        """N x E x h x w patch embeddings in CLIP's joint space (normalised or not: the
        segmenter normalises them), on the method's grid (CLIP's, or the VFM's)."""
        ...

    # Optional: ``logits(windows, text) -> N x Q x h x w`` for a method that classifies its own way
    # (CLIPSurgery's feature surgery); the segmenter then calls it instead of taking the cosine
    # of the normalised embeddings with the Q x E unit-norm text embeddings.


@dataclass(frozen=True)
class MethodSpec:
    """A method as the registry knows it.

    ``options`` is a frozen dataclass whose defaults are the method's published settings; each
    field's ``metadata["help"]`` is its help text (the CLI, demo and bench read them). ``settings``
    is a partial inference config (e.g. ``{"logit_scale": 50.0}``) the method's published runs used
    for the settings every method shares; ``dataset_settings`` the same per dataset preset key
    (e.g. ``{"voc21": {"bg_threshold": 0.5}}``).
    """

    name: str  # the key: --method NAME
    title: str  # as papers write it, e.g. "MaskCLIP"
    summary: str  # one line for --help and the demo
    build: Callable[[Any], Method]  # options -> method
    options: type = field(default=type(None))  # frozen dataclass of the method's own settings
    needs_vfm: bool = False  # a VFM is built and handed over in Windows.vfm
    source: str = ""  # where the defaults come from (published code, paper)
    settings: Mapping[str, Any] = field(default_factory=dict)
    dataset_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # prompts ("{}" = the class name) the method's published text side adds to the 80 OpenAI
    # ImageNet templates, e.g. CLIPSurgery's 5 scene prompts
    extra_templates: tuple[str, ...] = ()

    def default_options(self) -> Any:
        return self.options()

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.options)) if self.options is not type(None) else ()


@dataclass
class Windows:
    """A batch of windows and the models a method may read.

    Attributes:
        source: N x 3 x h x w, CLIP-normalised, float32; ``pixels`` is the same in CLIP's dtype.
        clip: the CLIP adapter.
        vfm: the VFM module, or None for methods without one.
        window: the protocol's window size in pixels (MAE runs at it, whatever the crop).
        to_vfm_input: CLIP-normalised pixels -> pixels normalised for the VFM.
    """

    source: torch.Tensor
    clip: ClipAdapter
    vfm: torch.nn.Module | None = None
    window: int = 336
    to_vfm_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    _vfm_features: torch.Tensor | None = field(default=None, repr=False)

    @property
    def pixels(self) -> torch.Tensor:
        """N x 3 x h x w, CLIP-normalised, in CLIP's dtype."""
        return self.source.to(self.clip.dtype)

    def vfm_pixels(self) -> torch.Tensor:
        """N x 3 x h x w: the windows as the VFM takes them (normalised for it; MAE: resized to
        the protocol's window size), in the VFM's dtype."""
        if self.vfm is None or self.to_vfm_input is None:
            raise ValueError("this method needs a VFM, but none was built")
        # re-normalised in float32, then cast to the VFM's dtype, as the published runs do
        pixels = self.to_vfm_input(self.source.float())  # N x 3 x h x w
        pixels = pixels.to(next((p.dtype for p in self.vfm.parameters()), pixels.dtype))
        if getattr(self.vfm, "runs_at_window", False):  # MAE: at the protocol's window size
            pixels = F.interpolate(pixels, size=(self.window, self.window), mode="bilinear", align_corners=False)
        return pixels

    def vfm_features(self) -> torch.Tensor:
        """N x C x h' x w' final-layer patch features of the VFM (computed once per batch)."""
        if self._vfm_features is None:
            self._vfm_features = self.vfm(self.vfm_pixels())
        return self._vfm_features


@dataclass(frozen=True)
class NoOptions:
    """The options of a method without settings of its own."""


def option_help(spec: MethodSpec) -> dict[str, str]:
    """Option name -> help text, from the options dataclass's field metadata."""
    return {f.name: f.metadata.get("help", "") for f in fields(spec.options)}
