"""CPU benchmark: each training-free method's published code (transcribed) vs ours, per window.

    python benchmarks/bench_methods.py [--methods sclip,clearclip,naclip,gem,clipsurgery] [--iters 3] [--out methods.json]

CLIP ViT-B/16 (OpenAI architecture) with RANDOM weights (cost does not depend on the values), fp32,
one process. One image of 336 x 672 CLIP-normalised pixels cut into four 336 x 336 windows (stride
112), 21 text queries (random unit vectors; the text side is not timed), logits averaged over the
windows (no refinement). Per method:

    published   tests/oracles/<method>_published.py: the published forward_slide, one window at a
                time, attention matrices per head with bmm (as the published code runs); GEM's through
                ClearCLIP's forward_slide; CLIPSurgery, whose repository has no sliding window, one
                published window computation after the other, averaged
    ours        ProxyCLIP.predict_logits: the windows batched, fused attention

Reported: milliseconds per window (median of --iters after --warmup), the speed-up, and the max abs
difference of the two logits. Then PAMR (the refinement NACLIP's published runs use; 10
iterations, dilations 8 and 16) on a 375 x 500 image with 21 queries: the published module vs ours.
Runs by hand, not in CI.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracles live with the tests
from oracles import (  # noqa: E402
    clearclip_published,
    clipsurgery_published,
    gem_published,
    naclip_published,
    pamr_published,
    sclip_published,
)

from proxyclip import ProxyCLIP, ProxyCLIPConfig  # noqa: E402
from proxyclip.apps.bench import device_name, time_calls, write_json_atomically  # noqa: E402
from proxyclip.model.clip import load_clip  # noqa: E402
from proxyclip.model.refine import pamr  # noqa: E402

CPU = torch.device("cpu")
IMAGE_HW = (336, 672)  # four 336 x 336 windows at stride 112
WINDOW, STRIDE = 336, 112
PAMR_HW = (375, 500)  # a typical PASCAL VOC photo


def published_call(method: str, model: ProxyCLIP, image: torch.Tensor, text: torch.Tensor):
    """The published code's whole-image loop for ``method`` (no refinement), as a no-argument call."""
    clip_model, img, size = model.clip_model, image[None], tuple(image.shape[-2:])
    if method == "sclip":
        return lambda: sclip_published.forward_slide(clip_model, img, text, size, stride=STRIDE, crop_size=WINDOW)
    if method == "clearclip":
        return lambda: clearclip_published.forward_slide(clip_model, img, text, size, stride=STRIDE, crop_size=WINDOW)
    if method == "naclip":
        return lambda: naclip_published.predict(clip_model, img, text, size, slide_stride=STRIDE, slide_crop=WINDOW,
                                                pamr_steps=0)
    if method == "gem":
        return lambda: gem_published.forward_slide(clip_model, img, text, size, stride=STRIDE, crop_size=WINDOW)
    if method == "clipsurgery":
        return lambda: _windows_averaged(lambda w: clipsurgery_published.window_logits(clip_model, w, text), img)
    raise ValueError(f"no published transcription for {method!r}")


def _windows_averaged(window_logits, img: torch.Tensor) -> torch.Tensor:
    """``window_logits`` of each 336-px window of ``img`` (1 x 3 x 336 x W, windows inside the
    image), one at a time, averaged where they overlap: 1 x Q x 336 x W."""
    width = img.shape[-1]
    starts = list(range(0, width - WINDOW, STRIDE)) + [width - WINDOW]
    total, count = 0, torch.zeros(width)
    for x1 in starts:
        logits = window_logits(img[..., x1 : x1 + WINDOW])  # 1 x Q x 336 x 336
        total = total + F.pad(logits, (x1, width - x1 - WINDOW))
        count[x1 : x1 + WINDOW] += 1
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="sclip,clearclip,naclip,gem,clipsurgery",
                        help="comma-separated (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="timed runs per variant (median) (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=21, help="text queries (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="save the numbers as JSON here")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message="ProxyCLIP built with RANDOM weights")
    torch.manual_seed(0)
    clip_model, tokenizer = load_clip("ViT-B-16", "openai", random_weights=True)
    text = F.normalize(torch.randn(args.queries, clip_model.visual.proj.shape[1]), dim=-1)  # Q x E
    image = torch.randn(3, *IMAGE_HW)  # CLIP-normalised
    windows = 4
    result = {"device": device_name(CPU), "threads": torch.get_num_threads(), "image": IMAGE_HW, "window": WINDOW,
              "stride": STRIDE, "queries": args.queries, "methods": {}}
    print(f"{result['device']}, {result['threads']} threads; {IMAGE_HW[0]} x {IMAGE_HW[1]} image, {windows} windows "
          f"of {WINDOW} px, {args.queries} queries, fp32")
    print(f"{'method':<10} {'published ms/window':>20} {'ours ms/window':>15} {'speed-up':>9} {'max |diff|':>11}")
    for method in args.methods.split(","):
        config = ProxyCLIPConfig.create(method=method, window=WINDOW, stride=STRIDE, refine="none")
        model = ProxyCLIP(clip_model, tokenizer, None, config)
        with torch.inference_mode():
            published = published_call(method, model, image, text)
            ours = lambda model=model: model.predict_logits(image, text)  # noqa: E731
            diff = float((ours() - published()[0]).abs().max())
            t_published = time_calls(published, CPU, args.warmup, args.iters) / windows
            t_ours = time_calls(ours, CPU, args.warmup, args.iters) / windows
        result["methods"][method] = {"published_s_per_window": t_published, "ours_s_per_window": t_ours,
                                     "speedup": t_published / t_ours, "max_abs_diff": diff}
        print(f"{method:<10} {t_published * 1e3:>20.1f} {t_ours * 1e3:>15.1f} {t_published / t_ours:>8.2f}x "
              f"{diff:>11.2e}")

    pixels, logits = torch.randn(1, 3, *PAMR_HW), torch.randn(1, args.queries, *PAMR_HW) * 0.1
    with torch.inference_mode():
        diff = float((pamr(pixels, logits) - pamr_published.pamr(pixels, logits)).abs().max())
        t_published = time_calls(lambda: pamr_published.pamr(pixels, logits), CPU, args.warmup, args.iters)
        t_ours = time_calls(lambda: pamr(pixels, logits), CPU, args.warmup, args.iters)
    result["pamr"] = {"image": PAMR_HW, "published_s": t_published, "ours_s": t_ours, "speedup": t_published / t_ours,
                      "max_abs_diff": diff}
    print(f"PAMR {PAMR_HW[0]} x {PAMR_HW[1]}, {args.queries} queries: published {t_published * 1e3:.0f} ms, ours "
          f"{t_ours * 1e3:.0f} ms ({t_published / t_ours:.2f}x), max |diff| {diff:.2e}")
    if args.out:
        write_json_atomically(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
