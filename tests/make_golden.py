"""Writes tests/data/golden/: tiny random weights in the original formats, a small image, and the
probabilities the ORACLE computes from them (run once: ``python tests/make_golden.py``).

Re-run only when the published computation itself is understood differently (the oracle changed);
never to make proxyclip's output pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import originals  # noqa: E402
from oracles import proxyclip_published as ref  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden"
CLASSES = [["cat", "kitten"], ["grass"], ["sky"]]
SETTINGS = {"window": 112, "stride": 56, "short_side": 112, "long_side": 2048, "beta": 1.2, "gamma": 3.0,
            "logit_scale": 40.0, "bg_threshold": 0.0}
# smaller than originals.TINY_VFMS, to keep the files small
OVERRIDES = {"dino": {"embed_dim": 8, "mlp_ratio": 2.0}, "dinov2": {"embed_dim": 8, "mlp_ratio": 2.0},
             "sam": {"embed_dim": 8, "mlp_ratio": 2.0, "neck_chans": 4}, "mae": {"embed_dim": 8, "mlp_ratio": 2.0}}
FILES = {"dino": "dino_vits8_tiny.pth", "dinov2": "dinov2_tiny_reg4.pth", "sam": "sam_tiny.pth",
         "mae": "mae_tiny_full.pth"}


def image() -> np.ndarray:
    """32 x 45 x 3 uint8: gradients, a bright block and noise (resized up to 112 x 158)."""
    rng = np.random.default_rng(13)
    y, x = np.mgrid[0:32, 0:45].astype(np.float32)
    img = np.stack([x * 5.5, 255 - y * 7, 128 + 90 * np.sin(x / 4 + y / 5)], axis=-1)
    img[6:17, 20:38] = (240, 230, 40)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


class _Holder:
    """What the oracle needs of a model: the CLIP, its tokenizer and the settings."""

    def __init__(self, clip_model, tokenizer, settings):
        from types import SimpleNamespace

        self.clip_model, self.tokenizer = clip_model, tokenizer
        self.config = SimpleNamespace(method="proxyclip", attention="proxy", pad_multiple=56, **settings)


def oracle_probs(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The oracle from the files as the original code reads them (safetensors; torch.load)."""
    import open_clip
    from safetensors.torch import load_file

    clip_model = open_clip.create_model(originals.GOLDEN_CLIP, pretrained=None)
    clip_model.load_state_dict({k: v.float() for k, v in load_file(str(GOLDEN / "clip.safetensors")).items()})
    clip_model.eval()
    checkpoint = torch.load(GOLDEN / FILES[kind], map_location="cpu", weights_only=True)
    vfm = originals.published(kind, checkpoint)
    holder = _Holder(clip_model, open_clip.get_tokenizer(originals.GOLDEN_CLIP), SETTINGS)
    pixels = np.asarray(Image.open(GOLDEN / "image.png").convert("RGB"))
    labels, probs = ref.segment(holder, pixels, CLASSES, vfm)
    return labels.numpy(), probs.numpy()


def main() -> None:
    from safetensors.torch import save_file

    GOLDEN.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image()).save(GOLDEN / "image.png")
    clip_state = {k: v.half().contiguous() for k, v in originals.golden_clip(seed=11).state_dict().items()}
    save_file(clip_state, str(GOLDEN / "clip.safetensors"))  # fp16, as OpenAI ships CLIP
    for i, (kind, name) in enumerate(FILES.items()):
        checkpoint = originals.original_state(kind, seed=20 + i, decoder=kind == "mae", **OVERRIDES[kind])
        torch.save(checkpoint, GOLDEN / name)
    expected = {}
    for kind in FILES:
        labels, probs = oracle_probs(kind)
        expected[f"{kind}_probs"], expected[f"{kind}_labels"] = probs.astype(np.float32), labels.astype(np.uint8)
    np.savez(GOLDEN / "expected.npz", **expected)
    settings = {"classes": CLASSES, "files": FILES, "timm_overrides": OVERRIDES, **SETTINGS}
    (GOLDEN / "settings.json").write_text(json.dumps(settings, indent=1))
    print({f.name: f.stat().st_size for f in sorted(GOLDEN.iterdir())})


if __name__ == "__main__":
    main()
