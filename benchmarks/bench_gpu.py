"""CUDA benchmark: ProxyCLIP DINO-B/16 and DINO-B/8 windows in fp16 and bf16, and fidelity.

    python benchmarks/bench_gpu.py [--batches 1,2,4,8,16,32] [--iters 20] [--out gpu.json]

Exits 0 with a message when no CUDA device is present. Random weights of the real architectures
(CLIP ViT-B/16, DINO ViT-B/16 and B/8); cost does not depend on the weights' values.

1. ``proxyclip bench`` rows proxyclip:dino_vitb16, proxyclip:dino_vitb8 (336 x 336 windows, batch 1 and
   the best of --batches) and whole-image, in fp16 and in bf16: windows/s, latency, peak memory
   (``max_memory_allocated``), FLOPs, and achieved FLOP/s as a fraction of an 8192^3 matmul in the
   same dtype measured in the same run. Table 5 (RTX 3090, fp16, batch 1): DINO-B/16 52.9 images/s,
   DINO-B/8 26.9 images/s.
2. The whole 500 x 375 image with DINO-B/8 through the straightforward reference
   (``proxyclip.reference``, one window at a time, attention repeated per head) and through
   ``ProxyCLIP.predict_logits``, both in fp16 as the published runs: seconds per image, speed-up;
   and the max abs logit difference of ours in fp16 / bf16 / fp32 from the reference in fp32
   (TF32 off).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracle lives with the tests
from oracles import proxyclip_published as ref  # noqa: E402

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.apps.bench import add_bench_parser, format_table, run_bench, time_calls, write_json_atomically

IMAGE_HW = (375, 500)


def bench_rows(precision: str, args: argparse.Namespace) -> dict:
    parser = argparse.ArgumentParser(prog="bench_gpu")
    add_bench_parser(parser.add_subparsers(dest="command"))
    bench_args = parser.parse_args([
        "bench", "--device", "cuda", "--precision", precision, "--random-weights",
        "--rows", "proxyclip:dino_vitb16,proxyclip:dino_vitb8,whole-image", "--batches", args.batches,
        "--warmup", str(args.warmup), "--iters", str(args.iters), "--matmul-size", "8192",
    ])
    return run_bench(bench_args)


def fidelity_and_speedup(args: argparse.Namespace) -> dict:
    """Reference vs ours on one whole image with DINO-B/8 (see the module docstring, part 2)."""
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the fidelity check
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    fp32 = ProxyCLIP.build(ProxyCLIPConfig(clip="ViT-B-16", vfm="dino_vitb8"), random_weights=True, device=device)
    pixels = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)  # H x W x 3
    image = fp32.preprocess(pixels)  # 3 x 336 x 448 on the GPU
    text = F.normalize(torch.randn(21, fp32.clip_model.visual.proj.shape[1], device=device), dim=-1)  # Q x E
    expected = ref.predict_logits(fp32, image, text, IMAGE_HW)  # Q x H x W, fp32 reference
    out: dict = {"max_abs_diff_vs_reference_fp32": {}}
    out["max_abs_diff_vs_reference_fp32"]["ours fp32"] = float(
        (fp32.predict_logits(image, text, out_size=IMAGE_HW) - expected).abs().max()
    )
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = fp32.astype(dtype)
        logits = model.predict_logits(image, text.to(dtype), out_size=IMAGE_HW)
        out["max_abs_diff_vs_reference_fp32"][f"ours {name}"] = float((logits - expected).abs().max())
        if name == "fp16":
            half_text = text.half()
            ref_s = time_calls(lambda m=model, t=half_text: ref.predict_logits(m, image, t, IMAGE_HW),
                               device, args.warmup, args.iters)
            ours_s = time_calls(lambda m=model, t=half_text: m.predict_logits(image, t, out_size=IMAGE_HW),
                                device, args.warmup, args.iters)
            out["whole_image_fp16"] = {
                "reference_s_per_image": ref_s, "ours_s_per_image": ours_s, "speedup": ref_s / ours_s,
            }
        del model
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="window batches to time (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls, median reported (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="save every number as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; skipped (run benchmarks/bench_cpu.py on the CPU)")
        return 0
    warnings.filterwarnings("ignore", message="ProxyCLIP built with RANDOM weights")
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device_name": torch.cuda.get_device_name()}
    for precision in ("fp16", "bf16"):
        results[precision] = bench_rows(precision, args)
        print(format_table(results[precision]), end="\n\n")
    results["reference_vs_ours"] = check = fidelity_and_speedup(args)
    speed = check["whole_image_fp16"]
    print(f"whole 500x375 image, DINO-B/8, fp16: reference {speed['reference_s_per_image'] * 1e3:.1f} ms, "
          f"ours {speed['ours_s_per_image'] * 1e3:.1f} ms, speed-up {speed['speedup']:.2f}x")
    for name, diff in check["max_abs_diff_vs_reference_fp32"].items():
        print(f"max |logit - reference fp32| {name}: {diff:.2e}")
    if args.out is not None:
        write_json_atomically(results, args.out)
        print(f"saved {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
