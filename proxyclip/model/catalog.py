"""Where the timm VFMs' weights come from, importable without torch (the weight check of
:mod:`proxyclip.model.hub` runs before anything heavy). The builders are ``VFM_BUILDERS`` in
:mod:`proxyclip.model.vfm`; a test checks that each timm builder loads the name given here.
"""

from __future__ import annotations

# VFM key (--vfm) -> the timm model (architecture.pretrained tag) whose weights it loads.
VFM_TIMM_NAMES = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "sam_vitb": "samvit_base_patch16.sa1b",
    "mae_vitb16": "vit_base_patch16_224.mae",
}
