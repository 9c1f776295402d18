"""CPU benchmark of methods against their published code: one 336 x 336 window, ViT-B/16, fp32.

    python benchmarks/bench_methods_multilayer.py [--methods gem,clipsurgery] [--windows 4] [--iters 3] [--out m.json]

CLIP ViT-B/16 (OpenAI architecture, QuickGELU) with RANDOM weights (cost does not depend on the
weights' values), ``--queries`` random unit text embeddings (the text side is not timed). Per
method, three runs over the same ``--windows`` windows of 336 x 336:

    published      the oracle of tests/oracles/<method>_published.py: the published inference
                   transcribed, one window at a time (the published loop)
    ours, batch 1  ProxyCLIP.window_logits one window at a time
    ours, batched  ProxyCLIP.window_logits on all windows at once (as the segmenter runs them)

Reported per method: seconds per window (median of --iters after one untimed run), the speed-up
over the published loop, the max abs difference of the logits from the published ones, and the
GMACs of one window counted with torch.utils.flop_counter (multiply-accumulates: Table 5's unit;
the published loop's and ours), next to Table 5's figure where the paper has one (GEM: 51.5).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracles live with the tests
from oracles import clipsurgery_published, gem_published  # noqa: E402

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.apps.bench import count_flops, device_name, time_calls, write_json_atomically

CPU = torch.device("cpu")
WINDOW = 336
TABLE5_GFLOPS = {"gem": 51.5}  # paper, Table 5 (336 x 336, CLIP ViT-B/16)


def published_call(method: str, model: ProxyCLIP, window: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One window through the published code's transcription: 1 x Q x H x W logits."""
    if method == "gem":
        return gem_published.forward_feature(model.clip_model, window, text)
    if method == "clipsurgery":
        return clipsurgery_published.window_logits(model.clip_model, window, text)
    raise ValueError(f"no published oracle for {method!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="gem,clipsurgery", help="methods with an oracle (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=4, help="336-px windows per run (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="timed runs per variant (median) (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=21, help="text queries (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="save the numbers as JSON here")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message="ProxyCLIP built with RANDOM weights")
    torch.manual_seed(0)
    base = ProxyCLIP.build(ProxyCLIPConfig.create(method="clip"), random_weights=True)
    windows = torch.randn(args.windows, 3, WINDOW, WINDOW)
    text = F.normalize(torch.randn(args.queries, base.clip.embed_dim), dim=-1)  # Q x E
    results: dict[str, dict] = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        model = base.with_config(method=method)
        runs = {
            "published": lambda model=model, method=method: torch.cat(
                [published_call(method, model, w[None], text) for w in windows]),
            "ours, batch 1": lambda model=model: torch.cat([model.window_logits(w[None], text) for w in windows]),
            "ours, batched": lambda model=model: model.window_logits(windows, text),
        }
        out: dict[str, dict] = {}
        expected = None
        for name, fn in runs.items():
            print(f"bench_methods: {method}, {name} ...", file=sys.stderr, flush=True)
            with torch.inference_mode():
                logits = fn()  # untimed first run
                seconds = time_calls(fn, CPU, 0, args.iters)
            expected = logits if expected is None else expected
            out[name] = {"seconds_per_window": seconds / args.windows,
                         "max_abs_diff_vs_published": float((logits - expected).abs().max())}
        with torch.inference_mode():
            out["published"]["gmacs_per_window"] = count_flops(
                lambda model=model, method=method: published_call(method, model, windows[:1], text)) / 2e9
            out["ours, batch 1"]["gmacs_per_window"] = count_flops(lambda model=model: model.window_logits(windows[:1], text)) / 2e9
        slow = out["published"]["seconds_per_window"]
        for r in out.values():
            r["speedup_vs_published"] = slow / r["seconds_per_window"]
        results[method] = out

    meta = {"cpu": device_name(CPU), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "windows": args.windows, "iters": args.iters, "queries": args.queries,
            "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; CLIP ViT-B/16 (random weights), "
          f"{args.windows} windows of {WINDOW} x {WINDOW}, {args.queries} queries, fp32")
    print(f"{'method':<12} {'run':<14} {'s/window':>9} {'speed-up':>9} {'max|dlogit|':>11} {'GMACs':>7} {'Table 5':>8}")
    for method, out in results.items():
        for name, r in out.items():
            gmacs = f"{r['gmacs_per_window']:>7.1f}" if "gmacs_per_window" in r else f"{'':>7}"
            paper = f"{TABLE5_GFLOPS[method]:>8.1f}" if method in TABLE5_GFLOPS and "gmacs_per_window" in r else ""
            print(f"{method:<12} {name:<14} {r['seconds_per_window']:>9.3f} {r['speedup_vs_published']:>8.2f}x "
                  f"{r['max_abs_diff_vs_published']:>11.2e} {gmacs} {paper}")
    print(f"load average after the run: {', '.join(f'{x:.1f}' for x in meta['load_average_after'])}")
    if args.out is not None:
        write_json_atomically({"meta": meta, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
