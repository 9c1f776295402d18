"""CPU benchmark: the straightforward reference vs our path, one whole image, DINO-B/8, one process.

    python benchmarks/bench_cpu.py [--iters 3] [--warmup 1] [--out cpu.json]

CLIP ViT-B/16 + DINO ViT-B/8 with RANDOM weights (cost does not depend on the weights' values;
no weights can be downloaded offline) on a 500 x 375 image, resized as the protocol does (short
side 336 -> 448 x 336, two 336-px windows), 21 text queries (random unit vectors; the text side is
not timed). Three runs of the whole-image path:

    reference fp32  proxyclip.reference: one window at a time, the L x L attention repeated per head
    ours fp32       ProxyCLIP.predict_logits: windows batched, one attention shared by the heads
    ours bf16       the same in bfloat16

Reported: seconds per image (median of --iters after --warmup), speed-up over the reference, max
abs difference of the logits from the fp32 reference, achieved FLOP/s as a fraction of a large
matmul's FLOP/s in the same dtype measured in this process (before and after the runs, the
better of the two), and the peak memory of one window, measured before anything is timed
(CPU resident-set rise, see proxyclip.apps.bench.peak_memory and _heap.release_cpu_memory_eagerly).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracle lives with the tests
from _heap import release_cpu_memory_eagerly, reuse_cpu_memory
from oracles import proxyclip_published as ref  # noqa: E402

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.apps.bench import (
    count_flops,
    device_name,
    matmul_throughput,
    peak_memory,
    time_calls,
    write_json_atomically,
)
from proxyclip.model.sliding import window_boxes

IMAGE_HW = (375, 500)
CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=3, help="timed runs per variant (median) (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed runs before timing, beyond the FLOP-counting run that always comes first "
                             "(default: %(default)s)")
    parser.add_argument("--queries", type=int, default=21, help="text queries (default: %(default)s)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="save the numbers as JSON here")
    args = parser.parse_args(argv)

    clean_heap = release_cpu_memory_eagerly()  # before anything big is allocated: see its docstring
    warnings.filterwarnings("ignore", message="ProxyCLIP built with RANDOM weights")
    torch.manual_seed(0)
    fp32 = ProxyCLIP.build(ProxyCLIPConfig(clip="ViT-B-16", vfm="dino_vitb8"), random_weights=True)
    bf16 = fp32.astype(torch.bfloat16)
    pixels = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)  # H x W x 3
    image = fp32.preprocess(pixels)  # 3 x 336 x 448, CLIP-normalised
    text = F.normalize(torch.randn(args.queries, fp32.clip_model.visual.proj.shape[1]), dim=-1)  # Q x E

    # Peak memory of one 336 x 336 window (the first window of the image), before anything is timed.
    window = image[None, :, :336, :336]  # 1 x 3 x 336 x 336
    with torch.inference_mode():
        memory = {
            "reference fp32": peak_memory(lambda: ref.forward_feature(fp32.clip_model, fp32.vfm, window, text), CPU),
            "ours fp32": peak_memory(lambda: fp32.window_logits(window, text), CPU),
            "ours bf16": peak_memory(lambda: bf16.window_logits(window.bfloat16(), text.bfloat16()), CPU),
        }
    reuse_cpu_memory()

    runs = {
        "reference fp32": (lambda: ref.predict_logits(fp32, image, text, IMAGE_HW), torch.float32),
        "ours fp32": (lambda: fp32.predict_logits(image, text, out_size=IMAGE_HW), torch.float32),
        "ours bf16": (lambda: bf16.predict_logits(image, text.bfloat16(), out_size=IMAGE_HW), torch.bfloat16),
    }
    dtypes = (torch.float32, torch.bfloat16)
    matmul = {dtype: matmul_throughput(CPU, dtype, args.matmul_size) for dtype in dtypes}
    results: dict[str, dict] = {}
    expected: torch.Tensor | None = None  # the fp32 reference's logits, Q x H x W
    for name, (fn, _dtype) in runs.items():
        print(f"bench_cpu: {name} ...", file=sys.stderr, flush=True)
        output: list[torch.Tensor] = []
        flops = count_flops(lambda fn=fn, output=output: output.append(fn()))  # also the warm-up run; Q x H x W logits
        seconds = time_calls(fn, CPU, args.warmup, args.iters)
        logits = output[0]
        expected = logits if expected is None else expected  # the reference runs first
        results[name] = {
            "seconds_per_image": seconds,
            "gflops_per_image": flops / 1e9,
            "achieved_gflops_per_s": flops / seconds / 1e9,
            "max_abs_diff_vs_reference_fp32": float((logits.float() - expected).abs().max()),
        }
        if name in memory:
            results[name]["window_peak_mib"] = memory[name]["peak_mib"]
            results[name]["window_extra_mib"] = memory[name]["extra_mib"]
    # The matmul again after the runs; the better of the two is the machine's throughput (a busy
    # machine lowers one of them). Fractions use it.
    for dtype in dtypes:
        matmul[dtype] = max(matmul[dtype], matmul_throughput(CPU, dtype, args.matmul_size))
    for r, (_, dtype) in zip(results.values(), runs.values()):
        r["matmul_gflops_per_s"] = matmul[dtype] / 1e9
        r["fraction_of_matmul"] = r["achieved_gflops_per_s"] * 1e9 / matmul[dtype]
    base = results["reference fp32"]["seconds_per_image"]
    for r in results.values():
        r["speedup_vs_reference"] = base / r["seconds_per_image"]

    meta = {
        "cpu": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_after": os.getloadavg(), "cpu_memory_in_clean_heap": clean_heap,
        "iters": args.iters,
        "warmup": args.warmup, "image_hw": IMAGE_HW, "resized_hw": list(image.shape[-2:]),
        "windows": len(window_boxes(*image.shape[-2:], 336, 112)),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "memory_kind": memory["ours fp32"]["memory_kind"],
    }
    print(f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; CLIP ViT-B/16 + DINO ViT-B/8 "
          f"(random weights), {IMAGE_HW[1]}x{IMAGE_HW[0]} image -> {image.shape[-1]}x{image.shape[-2]}, {meta['windows']} windows")
    print(f"{'':<16} {'s/image':>8} {'speed-up':>8} {'max|dlogit|':>11} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'mm GFLOP/s':>10} {'of mm':>6} {'window +MiB':>11}")
    for name, r in results.items():
        extra = f"{r['window_extra_mib']:>11.0f}" if "window_extra_mib" in r else f"{'':>11}"
        print(f"{name:<16} {r['seconds_per_image']:>8.2f} {r['speedup_vs_reference']:>7.2f}x "
              f"{r['max_abs_diff_vs_reference_fp32']:>11.2e} {r['gflops_per_image']:>7.0f} "
              f"{r['achieved_gflops_per_s']:>8.1f} {r['matmul_gflops_per_s']:>10.1f} {r['fraction_of_matmul']:>6.1%} {extra}")
    print(f"load average after the run: {', '.join(f'{x:.1f}' for x in meta['load_average_after'])} "
          "(other processes on the machine slow every variant alike)")
    if args.out is not None:
        write_json_atomically({"meta": meta, "results": results}, args.out)
        print(f"saved {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
