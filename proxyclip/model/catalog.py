"""The VFMs by name, importable without torch: the command line's choices and where weights come from.

``proxyclip --help`` reads these, so this module imports nothing heavy (the CLIP names are in
:mod:`proxyclip.model.config`). The builders themselves are ``VFM_BUILDERS`` in
:mod:`proxyclip.model.vfm`; a test checks that they agree with the names here.
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
