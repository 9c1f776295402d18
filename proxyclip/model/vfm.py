"""Vision foundation models (VFMs) from timm, reduced to one job: patch features of a window.

``VFM_BUILDERS`` maps a VFM name to a plain builder function. Every VFM takes a window that is
already normalised for it and returns B x C x h x w features of its final layer after the final
norm, class and register tokens dropped. It also states the pixel normalisation it expects as
``mean`` and ``std`` (RGB, 0-1 range), read from timm's pretrained config, and with
``runs_at_window`` whether the segmenter must first resize every window to the protocol's window
size (MAE, as in the published runs, whatever the crop).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from .attention import mean_head_attention
from .checkpoints import load_state_dict, read_checkpoint
from .pos_embed import resize_pos_embed_with_cls


class TimmViT(nn.Module):
    """A timm ViT (DINO, DINOv2, MAE) returning its final-layer patch tokens.

    Args:
        model: a timm ``VisionTransformer`` built with ``dynamic_img_size=True``.
        pos_recipe: "dino" or "exact" to resize the positional embedding as the published code
            did (see :mod:`proxyclip.pos_embed`); None to use timm's own resizing (DINOv2, whose
            original code timm matches).
        runs_at_window: the segmenter resizes every window to its configured window size first
            (MAE ran at the window size of the protocol, whatever the crop).
    """

    def __init__(self, model: nn.Module, pos_recipe: str | None, runs_at_window: bool = False):
        super().__init__()
        self.model = model
        self.pos_recipe = pos_recipe
        self.runs_at_window = runs_at_window
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.mean, self.std = _normalisation(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W (normalised for this VFM) -> B x C x h x w."""
        p = self.patch_size
        images = images[..., : images.shape[-2] // p * p, : images.shape[-1] // p * p]  # as a strided conv floors
        m = self.model
        if self.pos_recipe is None:
            out = m.forward_intermediates(
                images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
            )
            return out[-1]  # B x C x h x w
        x = m.patch_embed(images)  # B x h x w x C
        b, h, w, c = x.shape
        x = torch.cat([m.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)  # B x (1+hw) x C
        x = x + resize_pos_embed_with_cls(m.pos_embed[0], (h, w), self.pos_recipe).to(x.dtype)
        x = m.norm(m.blocks(m.norm_pre(m.pos_drop(x))))  # B x (1+hw) x C
        return x[:, 1:].transpose(1, 2).reshape(b, c, h, w)  # B x C x h x w

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """(h, w) patch grid of the features and attention of B x 3 x H x W images."""
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def last_attention(self, images: torch.Tensor, prefix: bool = False) -> torch.Tensor:
        """The last block's own self-attention, averaged over heads (Table 4, lower half).

        ``mean_h softmax(q_h k_h^T / sqrt(d))`` with q, k of the last block (after ``norm1`` and
        any q/k norm), the tokens entering it computed exactly as :meth:`forward` does. The
        class and register tokens are dropped from the queries and keys before the softmax (the
        published ProxyCLIP code, which reads DINO's last-block q and k through a hook, drops the
        class token from them), so each row is a distribution over the patches.

        Args:
            images: B x 3 x H x W, normalised for this VFM.
            prefix: keep the class and register tokens (first rows and columns): the attention
                exactly as the block runs it.

        Returns:
            B x L x L float32 (L = h * w, row-major patches; L + prefix tokens with ``prefix``).
        """
        p = self.patch_size
        images = images[..., : images.shape[-2] // p * p, : images.shape[-1] // p * p]
        m = self.model
        if self.pos_recipe is None:  # timm's own tokens, as forward: the output of the last block but one
            if len(m.blocks) < 2:
                raise ValueError("last_attention needs a VFM of two blocks or more")
            spatial, prefix_tokens = m.forward_intermediates(
                images, indices=[len(m.blocks) - 2], return_prefix_tokens=True, norm=False, output_fmt="NLC",
                intermediates_only=True, stop_early=True)[0]  # B x hw x C, B x P x C
            x = torch.cat([prefix_tokens, spatial], dim=1)  # B x (P + hw) x C
        else:  # as forward
            x = m.patch_embed(images)  # B x h x w x C
            b, h, w, c = x.shape
            x = torch.cat([m.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)  # B x (1+hw) x C
            x = x + resize_pos_embed_with_cls(m.pos_embed[0], (h, w), self.pos_recipe).to(x.dtype)
            x = m.blocks[:-1](m.norm_pre(m.pos_drop(x)))  # B x (1 + hw) x C
        block = m.blocks[-1]
        attn = block.attn
        y = block.norm1(x)
        b, n, c = y.shape
        q, k, _ = attn.qkv(y).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # B x H x N x d
        q, k = attn.q_norm(q), attn.k_norm(k)
        start = 0 if prefix else m.num_prefix_tokens
        return mean_head_attention(q[:, :, start:], k[:, :, start:], attn.scale)  # B x L x L


class SamEncoder(nn.Module):
    """SAM's image encoder (timm ``samvit``): every window is resized to the encoder's input size
    (1024 x 1024 for SAM) first, as the published code calls ``image_encoder`` on it."""

    runs_at_window = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.input_size = int(model.pos_embed.shape[1]) * self.patch_size  # SAM's img_size: 64 x 16 = 1024
        self.mean, self.std = _normalisation(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x 256 x 64 x 64 (neck output)."""
        size = (self.input_size, self.input_size)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.model.forward_features(images)  # B x 256 x h x w

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """(h, w) patch grid of the features and attention (fixed: the input is resized)."""
        return self.input_size // self.patch_size, self.input_size // self.patch_size

    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's own self-attention, averaged over heads (Table 4, lower half).

        ``mean_h softmax(q_h k_h^T / sqrt(d) + rel_h)``: SAM's last block attends globally (SAM
        ViT-B's global blocks are 2, 5, 8 and 11; the others attend within 14 x 14 windows), with
        its decomposed relative-position bias (timm's ``get_decomposed_rel_pos_bias``, SAM's
        ``add_decomposed_rel_pos``). SAM has no class token.

        Args:
            images: B x 3 x H x W, normalised for SAM (resized to ``input_size`` here).

        Returns:
            B x L x L float32, L = 64 * 64 patches at 1024 x 1024, row-major.

        Raises:
            ValueError: the last block attends within windows (not SAM's layout).
        """
        from timm.layers import resample_abs_pos_embed_nhwc
        from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

        size = (self.input_size, self.input_size)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        m = self.model
        x = m.patch_embed(images)  # B x h x w x C
        if m.pos_embed is not None:  # as timm's forward_features
            x = x + resample_abs_pos_embed_nhwc(m.pos_embed, x.shape[1:3])
        x = m.blocks[:-1](m.norm_pre(m.patch_drop(m.pos_drop(x))))  # B x h x w x C
        block = m.blocks[-1]
        if block.window_size > 0:
            raise ValueError("the last SAM block attends within windows; its attention is not one L x L matrix")
        attn = block.attn
        y = block.norm1(x)
        b, h, w, c = y.shape
        qkv = attn.qkv(y.reshape(b, h * w, c)).reshape(b, h * w, 3, attn.num_heads, -1)  # B x N x 3 x H x d
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B x H x N x d
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = None
        if attn.use_rel_pos:
            def bias(head: int) -> torch.Tensor:  # B x N x N, from the head's unscaled queries
                return get_decomposed_rel_pos_bias(q[:, head], attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
        return mean_head_attention(q, k, attn.scale, bias)  # B x N x N


def create_timm(
    name: str, weights: str | None, random_weights: bool, drop_keys: tuple[str, ...] = (), **kwargs
) -> nn.Module:
    """``timm.create_model`` with pretrained weights from the hub cache or a local file.

    A local file (``weights``) is read by :func:`proxyclip.model.checkpoints.read_checkpoint` (no
    pickled code runs), mapped to timm's keys by timm's own ``checkpoint_filter_fn`` of the
    architecture (original DINO, DINOv2, SAM and MAE files load as they are), stripped of the keys
    starting with ``drop_keys``, and loaded strictly.

    Raises:
        WeightsError: the weights are missing or do not fit (naming the keys), with how to supply them.
    """
    if weights and not random_weights:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        state = read_checkpoint(weights)
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(dict(state), model)
        state = {k: v for k, v in state.items() if not k.startswith(drop_keys)}
        load_state_dict(model, state, f"VFM weights file {weights} for timm {name}")
        return model.eval().requires_grad_(False)
    try:
        model = timm.create_model(
            name,
            pretrained=not random_weights,
            num_classes=0,
            **kwargs,
        )
    except Exception as exc:  # timm and huggingface_hub raise many types here
        if random_weights:
            raise
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise WeightsError(
            f"VFM weights timm {name} could not be loaded ({type(exc).__name__}: {reason}). "
            "Pass a local checkpoint with --vfm-weights FILE, or put the weights in the Hugging Face "
            "cache (HF_HOME) and set HF_HUB_OFFLINE=1, or connect to the internet."
        ) from exc
    return model.eval().requires_grad_(False)


def _normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A timm model's pixel mean and std (RGB, 0-1 range) from its pretrained config."""
    cfg = model.pretrained_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])


def _dino(name: str) -> Callable[..., nn.Module]:
    def build(weights: str | None = None, random_weights: bool = False, **timm_kwargs) -> nn.Module:
        model = create_timm(name, weights, random_weights, dynamic_img_size=True, **timm_kwargs)
        return TimmViT(model, pos_recipe="dino")

    build.__doc__ = f"DINO ({name}): final-layer patch tokens at the window's size."
    return build


def build_dinov2_vitb14_reg(weights: str | None = None, random_weights: bool = False, **timm_kwargs) -> nn.Module:
    """DINOv2 ViT-B/14 with 4 registers: final-layer patch tokens at the window's size."""
    model = create_timm("vit_base_patch14_reg4_dinov2.lvd142m", weights, random_weights, dynamic_img_size=True,
                        **timm_kwargs)
    return TimmViT(model, pos_recipe=None)


def build_mae_vitb16(weights: str | None = None, random_weights: bool = False, **timm_kwargs) -> nn.Module:
    """MAE ViT-B/16: windows resized to the window size, as in the published runs.

    The encoder's keys of a file are used; a decoder's (``mae_pretrain_vit_base_full.pth``) are
    ignored, as the published code's ``load_state_dict(strict=False)`` ignores them."""
    model = create_timm("vit_base_patch16_224.mae", weights, random_weights, drop_keys=("decoder_",),
                        dynamic_img_size=True, **timm_kwargs)
    return TimmViT(model, pos_recipe="exact", runs_at_window=True)


def build_sam_vitb(weights: str | None = None, random_weights: bool = False, **timm_kwargs) -> nn.Module:
    """SAM ViT-B image encoder at 1024 x 1024 (a 64 x 64 grid of 256-d features).

    Built with SAM's LayerNorm epsilon 1e-6 (segment-anything ``build_sam.py``: ``norm_layer=
    partial(torch.nn.LayerNorm, eps=1e-6)``; timm's samvit defaults to ``nn.LayerNorm``, 1e-5). The
    neck's ``LayerNorm2d`` is 1e-6 in both."""
    timm_kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    return SamEncoder(create_timm("samvit_base_patch16.sa1b", weights, random_weights, **timm_kwargs))


# VFM name -> builder(weights=None, random_weights=False) -> nn.Module
VFM_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "dino_vits16": _dino("vit_small_patch16_224.dino"),
    "dino_vits8": _dino("vit_small_patch8_224.dino"),
    "dino_vitb16": _dino("vit_base_patch16_224.dino"),
    "dino_vitb8": _dino("vit_base_patch8_224.dino"),
    "dinov2_vitb14_reg": build_dinov2_vitb14_reg,
    "sam_vitb": build_sam_vitb,
    "mae_vitb16": build_mae_vitb16,
}


# Stable Diffusion 1.5's UNet (appendix A of the paper); diffusers is imported only when it is built.
from .sd import build_sd15  # noqa: E402

VFM_BUILDERS["sd15"] = build_sd15
