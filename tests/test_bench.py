"""``proxyclip bench``: the JSON it writes, and the FLOP formulas it adds. No timed assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_CLIP

from proxyclip.apps.bench import count_flops, default_rows, write_json_atomically
from proxyclip.apps.cli import main


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick run of every row: tiny CLIP, real DINO-B/16 and B/8 (random weights), window 56."""
    out = tmp_path_factory.mktemp("bench") / "sub" / "bench.json"
    rc = main(["bench", "--quick", "--random-weights", "--device", "cpu", "--clip", TINY_CLIP,
               "--clip-pretrained", "", "--out", str(out)])
    assert rc == 0
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left behind
    return json.loads(out.read_text())


def test_bench_json_fields_and_sane_values(bench_json: dict) -> None:
    meta, rows = bench_json["meta"], {r["row"]: r for r in bench_json["rows"]}
    assert list(rows) == list(default_rows("dino_vitb8"))
    assert {"clip", "maskclip", "proxyclip:dino_vitb16", "proxyclip:dino_vitb8", "whole-image"} <= set(rows)
    assert meta["random_weights"] and meta["window"] == 56 and meta["precision"] == "fp32"
    assert bench_json["matmul"]["tflops"] > 0
    for r in rows.values():
        assert r["flops"] > 0 and r["params_clip_visual_m"] < r["params_clip_m"]
        assert r["batch1"]["per_s"] > 0 and r["batch1"]["latency_ms"] > 0
        assert r["batch1"]["peak_mib"] > 0 and r["batch1"]["extra_mib"] > -1
        assert r["achieved_tflops"] > 0 and r["fraction_of_matmul"] > 0
    for name in ("clip", "maskclip", "proxyclip:dino_vitb16", "proxyclip:dino_vitb8"):
        assert [b["batch"] for b in rows[name]["per_batch"]] == [1, 2]
    assert rows["clip"]["params_vfm_m"] == rows["maskclip"]["params_vfm_m"] == 0
    assert 85 < rows["proxyclip:dino_vitb16"]["params_vfm_m"] < 87  # DINO ViT-B: 85.8 M
    # Cost ordering of Table 5: MaskCLIP < CLIP < ProxyCLIP DINO-B/16 < DINO-B/8.
    assert rows["maskclip"]["flops"] < rows["clip"]["flops"]
    assert rows["clip"]["flops"] < rows["proxyclip:dino_vitb16"]["flops"] < rows["proxyclip:dino_vitb8"]["flops"]


def test_bench_whole_image_row(bench_json: dict) -> None:
    rows = {r["row"]: r for r in bench_json["rows"]}
    whole, window = rows["whole-image"], rows["proxyclip:dino_vitb8"]
    assert whole["unit"] == "images" and whole["image_hw"] == [375, 500]
    height, width = whole["resized_hw"]
    assert height == 56 and 74 <= width <= 75  # short side to the window, as the protocol does
    assert whole["windows_per_image"] == 2  # a 56 x 75 image, 56-px windows, stride 28
    # Its windows run batched: the image costs its windows' FLOPs, plus a little resizing.
    assert 2 <= whole["flops"] / window["flops"] < 2.05


def test_flops_of_multihead_attention_fast_path() -> None:
    """nn.MultiheadAttention in inference runs one fused op that PyTorch does not count by itself."""
    batch, length, dim, heads = 2, 50, 64, 4
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    x = torch.randn(batch, length, dim)
    with torch.inference_mode():
        flops = count_flops(lambda: mha(x, x, x, need_weights=False))
    expected = 2 * batch * length * dim * dim * 4 + 2 * 2 * batch * length * length * dim  # projections + attention
    assert flops == expected


def test_flops_of_timm_attention_on_cpu() -> None:
    """timm's fused attention on the CPU (flash attention for CPU) is counted too."""
    block = timm.create_model("vit_small_patch16_224", pretrained=False, embed_dim=64, depth=1, num_heads=4,
                              num_classes=0).blocks[0].attn.eval()
    x = torch.randn(1, 50, 64)
    with torch.inference_mode():
        flops = count_flops(lambda: block(x))
    expected = 2 * 50 * 64 * 64 * 4 + 2 * 2 * 50 * 50 * 64  # qkv + proj, QK^T + AV
    assert flops == expected


def test_bench_rejects_unknown_rows_and_fp16_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--rows", "clip,nope", "--random-weights", "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--precision", "fp16", "--random-weights", "--device", "cpu"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert main(["bench", "--batches", "1,x", "--random-weights", "--device", "cpu"]) == 2


def test_write_json_atomically_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old contents that are longer than the new ones" * 10)
    write_json_atomically({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_attention_benchmark_variants_compute_attention() -> None:
    """benchmarks/bench_cpu_attention.py times what it says: both explicit bf16 variants are
    softmax(q k^T / sqrt(d)) v, and only the two-pass one keeps peaked attention accurate."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu_attention.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 64, generator=generator) * s for s in (3, 3, 1))  # peaked attention
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.inference_mode():
        errors = {shift: float((module.blocked(q, k, v, block=32, shift=shift).double() - exact).abs().max())
                  for shift in (False, True)}
    assert errors[True] < 0.03  # about bf16's resolution of the output
    assert errors[False] > 2 * errors[True]  # scores rounded to bf16 before the softmax
