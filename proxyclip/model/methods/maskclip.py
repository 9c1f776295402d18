"""MaskCLIP (Zhou et al., ECCV 2022), training-free: each patch keeps its own last-block value.

As the ProxyCLIP paper's baseline (and ProxyCLIP's published code with the attention removed):
the last block's value projection of ``ln_1(x)``, out_proj, no residual and no MLP, ``ln_post``
and ``proj``; the class token dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_method
from .base import MethodSpec, NoOptions, Windows
from .proxyclip import last_block_values

if TYPE_CHECKING:
    import torch


def build(options: object):
    def maskclip(windows: Windows) -> torch.Tensor:
        clip = windows.clip
        v = last_block_values(windows)  # N x D x h x w
        z = clip.project(clip.block(-1).out_proj(v.flatten(2).transpose(1, 2)))  # N x hw x E
        return clip.to_map(z, tuple(v.shape[-2:]))  # N x E x h x w

    return maskclip


SPEC = register_method(MethodSpec(
    name="maskclip", title="MaskCLIP", build=build, options=NoOptions,
    summary="CLIP's last-block values, no attention (the training-free MaskCLIP baseline)",
    source="Zhou et al., ECCV 2022; ProxyCLIP's baseline rows (Table 1, Table 5)",
))
