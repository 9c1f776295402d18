"""Tiny random VFMs and CLIPs saved in the ORIGINAL checkpoint layouts users have.

Each VFM comes as the original project's state dict (facebookresearch/dino, facebookresearch/dinov2
with registers, segment-anything's whole ``Sam`` with ``image_encoder.*`` keys, MAE's ``{"model": ...}``
with or without its decoder), made from a tiny timm model of the real architecture by the
inverse of the key mapping, with every tensor jittered so that norms, layer scales and relative
positions all matter. The oracle reads these dicts as they are; proxyclip loads the saved files
through ``VFM_BUILDERS[key](weights=FILE, **timm_kwargs)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import timm
import torch
from oracles.proxyclip_published import PublishedVFM

# kind -> (VFM_BUILDERS key, timm model name, tiny timm kwargs, heads)
TINY_VFMS = {
    "dino": ("dino_vits8", "vit_small_patch8_224.dino",
             dict(img_size=32, embed_dim=32, depth=2, num_heads=2), 2),
    "dinov2": ("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m",
               dict(img_size=56, embed_dim=32, depth=2, num_heads=2), 2),
    "sam": ("sam_vitb", "samvit_base_patch16.sa1b",
            dict(img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=3,
                 neck_chans=16), 2),
    "mae": ("mae_vitb16", "vit_base_patch16_224.mae",
            dict(img_size=64, embed_dim=32, depth=2, num_heads=2), 2),
}

# a CLIP small enough to keep in the repository: the text tower's 49408-token embedding dominates
GOLDEN_CLIP = "proxyclip-test-golden"
open_clip.add_model_config(Path(__file__).parent / "configs" / f"{GOLDEN_CLIP}.json")


def _jitter(state: dict[str, torch.Tensor], scale: float = 0.1) -> dict[str, torch.Tensor]:
    return {k: v + scale * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def original_state(kind: str, seed: int = 0, decoder: bool = False, full: bool = False, jitter: float = 0.1,
                   model_name: str | None = None, **overrides) -> dict:
    """A tiny random checkpoint of ``kind`` in its original layout (what ``torch.save`` would write).

    Args:
        decoder: MAE only: also the decoder's keys (``mae_pretrain_vit_base_full.pth``).
        full: the full-size architecture (timm's defaults) instead of the tiny one.
        model_name: another timm model of the kind (e.g. "vit_base_patch8_224.dino").
        jitter: the standard deviation of the noise added to every tensor.
        overrides: timm kwargs replacing the tiny defaults.
    """
    _, name, kwargs, _ = TINY_VFMS[kind]
    name = model_name or name
    kwargs = {**({} if full else kwargs), **overrides}
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    state = _jitter({k: v.detach().clone() for k, v in model.state_dict().items()}, jitter)
    dim = state["patch_embed.proj.weight"].shape[0]
    if kind == "dinov2":  # timm folds the class token's position into cls_token; the original does not
        state["pos_embed"] = torch.cat([0.1 * torch.randn(1, 1, dim), state["pos_embed"]], dim=1)
        state["register_tokens"] = state.pop("reg_token")
        state["mask_token"] = torch.zeros(1, dim)
        return state
    if kind == "sam":  # the whole Sam: image_encoder.* (mlp.lin1/lin2) and a prompt encoder / mask decoder
        out = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in state.items()}
        out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 8)
        out["mask_decoder.iou_token.weight"] = torch.randn(1, 8)
        return out
    if kind == "mae":
        if decoder:
            dec = 2  # the decoder's width (512 in MAE); its values never matter
            state["mask_token"] = torch.zeros(1, 1, dec)
            state["decoder_embed.weight"] = torch.randn(dec, dim)
            state["decoder_pos_embed"] = torch.randn(1, state["pos_embed"].shape[1], dec)
            state["decoder_blocks.0.norm1.weight"] = torch.ones(dec)
            state["decoder_norm.weight"] = torch.ones(dec)
            state["decoder_pred.weight"] = torch.randn(16 * 16 * 3, dec)
        return {"model": state}
    return state


def published(kind: str, checkpoint: dict, num_heads: int | None = None) -> PublishedVFM:
    """The oracle's VFM from an original checkpoint (as loaded: MAE's ``{"model": ...}`` unwrapped);
    ``num_heads`` 12 for the full-size ViT-B architectures."""
    state = checkpoint.get("model", checkpoint) if kind == "mae" else checkpoint
    return PublishedVFM(kind, state, num_heads or TINY_VFMS[kind][3])


def load_vfm(kind: str, path: str | Path, full: bool = False, **overrides):
    """proxyclip's VFM for ``kind`` loaded from an original checkpoint file, through the real builder."""
    from proxyclip.model.vfm import VFM_BUILDERS

    key, _, kwargs, _ = TINY_VFMS[kind]
    return VFM_BUILDERS[key](weights=str(path), **{**({} if full else kwargs), **overrides})


def golden_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(GOLDEN_CLIP, pretrained=None)
    model.load_state_dict(_jitter(model.state_dict(), 0.02))
    return model.eval().requires_grad_(False)
