"""CUDA correctness in reduced precision (marker: gpu; skipped without CUDA, so never in CI)."""

import numpy as np
import pytest
import torch
from conftest import tiny_dino, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_logits_stay_close_to_fp32(dtype):
    torch.manual_seed(0)
    image = torch.randn(3, 200, 300)
    ref_model = tiny_model(vfm=tiny_dino()).cuda()
    ref = ref_model.predict_logits(image, ref_model.encode_classes(["a", "b", "c"])).cpu()
    model = ref_model.astype(dtype)
    low = model.predict_logits(image, model.encode_classes(["a", "b", "c"])).cpu()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05


def test_fullsize_fp16_matches_fp32_on_cuda():
    from proxyclip import ProxyCLIP

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    fp32 = ProxyCLIP.build(random_weights=True, device="cuda")
    fp16 = fp32.astype(torch.float16)
    pixels = fp32.preprocess(image)
    a = fp32.predict_logits(pixels, fp32.encode_classes(["cat", "dog", "sky"]))
    b = fp16.predict_logits(pixels, fp16.encode_classes(["cat", "dog", "sky"]))
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.02
