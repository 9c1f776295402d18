"""Why bf16 speeds up the CPU path less than its matmuls: DINO-B/8's self-attention, measured alone.

    python benchmarks/bench_cpu_attention.py [--iters 5] [--spread 3] [--out attention.json]

One layer of DINO ViT-B/8 on the two windows of a 500 x 375 image (B=2 windows, 12 heads,
L=1765 tokens, 64 channels a head) in four ways:

    sdpa fp32        F.scaled_dot_product_attention in fp32 (what timm runs; PyTorch's CPU flash kernel)
    sdpa bf16        the same kernel in bf16 (fp32 scores and softmax inside)
    blocked bf16     a block of queries of one head at a time: scores = q k^T rounded to bf16,
                     softmax, @ v (the explicit attention of most ViT code, in cache-sized blocks)
    two-pass bf16    as blocked, but the scores are computed twice, the second time shifted by the
                     row maximum inside the matmul's fp32 accumulator (bf16 rounding then only
                     touches the entries far below the maximum, which the softmax ignores)

Queries and keys are drawn with a standard deviation of --spread: 1 gives the nearly flat attention
of random weights, 3 the peaked attention of trained ViTs (score ranges of tens). Reported:
milliseconds per layer, GFLOP/s (4 B H L^2 d FLOPs), and the max abs difference of the output
from sdpa in float64. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from proxyclip.apps.bench import device_name, time_calls, write_json_atomically

CPU = torch.device("cpu")
B, H, L, D = 2, 12, 1765, 64  # two 336-px windows of DINO-B/8: 42 x 42 patches + the class token


def blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 512, shift: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, B x H x L x d, one head and ``block`` queries at a time (bf16)."""
    d = q.shape[-1]
    if shift:  # [q, -m] @ [k, 1]^T = q k^T - m, with m (exactly representable) from a first pass
        q = torch.cat([q * d**-0.5, torch.zeros_like(q[..., :1])], dim=-1)  # B x H x L x (d+1)
        k = torch.cat([k, torch.ones_like(k[..., :1])], dim=-1)
    else:
        q = q * d**-0.5  # exact: a power of two for d = 64
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], d, dtype=q.dtype)  # B x L x H x d
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            kt, vh = k[b, h].t(), v[b, h]
            for start in range(0, q.shape[2], block):
                qb = q[b, h, start:start + block]  # n x d(+1)
                s = qb @ kt  # n x L, rounded to bf16
                if shift:
                    qb[:, d] = -s.amax(dim=-1)
                    s = torch.mm(qb, kt, out=s)  # n x L: q k^T - max, rounded after the subtraction
                torch.mm(torch.softmax(s, dim=-1, out=s), vh, out=out[b, start:start + block, h])
    return out.transpose(1, 2)  # B x H x L x d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=5, help="timed runs (median) (default: %(default)s)")
    parser.add_argument("--spread", type=float, default=3.0,
                        help="standard deviation of q and k: 1 flat, 3 peaked attention (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="save the numbers as JSON here")
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, B, H, L, D, generator=generator)
    qkv[:2] *= args.spread
    q32, k32, v32 = qkv.unbind(0)
    q16, k16, v16 = qkv.bfloat16().unbind(0)
    exact = {  # in float64, from the inputs each variant gets
        torch.float32: F.scaled_dot_product_attention(q32.double(), k32.double(), v32.double()),
        torch.bfloat16: F.scaled_dot_product_attention(q16.double(), k16.double(), v16.double()),
    }
    runs = {
        "sdpa fp32": lambda: F.scaled_dot_product_attention(q32, k32, v32),
        "sdpa bf16": lambda: F.scaled_dot_product_attention(q16, k16, v16),
        "blocked bf16": lambda: blocked(q16, k16, v16),
        "two-pass bf16": lambda: blocked(q16, k16, v16, shift=True),
    }
    flops = 4 * B * H * L * L * D
    results = {}
    print(f"{device_name(CPU)}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"B={B} H={H} L={L} d={D}, q and k with std {args.spread}")
    print(f"{'':<14} {'ms/layer':>9} {'GFLOP/s':>8} {'max|d out|':>11}")
    with torch.inference_mode():
        for name, fn in runs.items():
            out = fn()
            error = float((out.double() - exact[out.dtype]).abs().max())
            seconds = time_calls(fn, CPU, warmup=1, iters=args.iters)
            results[name] = {"ms_per_layer": seconds * 1e3, "gflops_per_s": flops / seconds / 1e9, "max_abs_error": error}
            print(f"{name:<14} {seconds * 1e3:>9.1f} {flops / seconds / 1e9:>8.1f} {error:>11.2e}")
    if args.out is not None:
        meta = {"cpu": device_name(CPU), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "shape_bhld": [B, H, L, D], "spread": args.spread, "iters": args.iters}
        write_json_atomically({"meta": meta, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
