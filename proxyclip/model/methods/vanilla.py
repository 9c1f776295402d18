"""Vanilla CLIP: the unchanged last block's patch tokens, ``ln_post`` and ``proj`` (class token dropped)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_method
from .base import MethodSpec, NoOptions, Windows

if TYPE_CHECKING:
    import torch


def build(options: object):
    def vanilla_clip(windows: Windows) -> torch.Tensor:
        clip = windows.clip
        x = clip.block(-1).forward(clip.last_block_input(windows.pixels))  # N x (1 + hw) x D
        return clip.to_map(clip.project(x[:, 1:]), clip.grid(windows.pixels))  # N x E x h x w

    return vanilla_clip


SPEC = register_method(MethodSpec(
    name="clip", title="CLIP", build=build, options=NoOptions,
    summary="the plain last block of CLIP, patch tokens as they are (the CLIP baseline)",
    source="Radford et al., 2021; ProxyCLIP's baseline rows (Table 1, Table 5)",
))
