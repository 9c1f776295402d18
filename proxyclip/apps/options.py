"""Command-line options shared by the sub-commands: models, weights, method settings, device.

Exit codes of every command: 0 success; 1 some inputs failed (the others were processed); 2 bad
usage or configuration (class names, weights, output folder), nothing processed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..errors import ProxyCLIPError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
PRECISIONS = ("fp32", "fp16", "bf16")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose the models and their weights (shared by every sub-command)."""
    from ..model.clip import CLIP_MODELS
    from ..model.vfm import VFM_BUILDERS

    g = parser.add_argument_group("models and weights")
    g.add_argument("--clip", default="ViT-B-16", metavar="NAME",
                   help=f"open_clip ViT architecture (paper: {', '.join(CLIP_MODELS)}; default: %(default)s)")
    g.add_argument("--clip-pretrained", default=None, metavar="TAG",
                   help="open_clip pretrained tag; decides QuickGELU (default: openai for ViT-B-16/L-14, "
                        "laion2b_s32b_b79k for ViT-H-14)")
    g.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="local CLIP checkpoint (.safetensors or a state dict) instead of downloading the tag's weights")
    g.add_argument("--vfm", default="dino_vitb8", choices=sorted(VFM_BUILDERS),
                   help="vision foundation model giving the proxy attention (default: %(default)s)")
    g.add_argument("--vfm-weights", default=None, metavar="FILE",
                   help="local VFM checkpoint (timm format, .safetensors or a state dict) instead of the hub")
    g.add_argument("--method", default="proxyclip", choices=["proxyclip", "maskclip", "clip"],
                   help="proxyclip, or a training-free baseline without a VFM: maskclip (values, no attention) "
                        "or clip (the plain last block) (default: %(default)s)")
    g.add_argument("--random-weights", action="store_true",
                   help="build the real architectures with RANDOM weights (tests and benchmarks only: "
                        "the output is meaningless)")
    g.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ... (default: %(default)s)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="model precision; fp16 needs CUDA, bf16 runs on CUDA and recent CPUs (default: %(default)s)")


def add_inference_args(parser: argparse.ArgumentParser, window: int | None = 336, stride: int | None = 112,
                       short_side: int | None = 336, bg_threshold: float | None = 0.0,
                       long_side: int | None = 2048) -> None:
    """Options of the method itself; a default of None means "from the dataset preset"."""
    g = parser.add_argument_group("method settings")
    g.add_argument("--beta", type=float, default=1.2, help="shift factor of eq. 6 (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=3.0, help="scale factor of eq. 6 (default: %(default)s)")
    g.add_argument("--attention", default="proxy", choices=["proxy", "plain", "norm", "mask"],
                   help="proxy (the method, eqs. 4-8) or an ablation of the paper: plain (softmax of the "
                        "similarity, Table 4), norm (normalisation without mask, Table 4), mask (fixed threshold "
                        "--alpha without normalisation, Table 6) (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=0.0,
                   help="similarity threshold of the 'mask' ablation (eq. 9; default: %(default)s)")
    g.add_argument("--window", type=int, default=window, help="sliding-window size in pixels (default: %(default)s)")
    g.add_argument("--stride", type=int, default=stride, help="sliding-window stride in pixels (default: %(default)s)")
    g.add_argument("--bg-threshold", type=float, default=bg_threshold,
                   help="pixels whose top class probability is below this become class 0, the first class "
                        "(default: %(default)s, off)")
    g.add_argument("--short-side", type=int, default=short_side,
                   help="resize images so their short side is this many pixels, long side at most --long-side; "
                        "0 keeps the size (default: %(default)s)")
    g.add_argument("--long-side", type=int, default=long_side,
                   help="cap on the long side after resizing (default: %(default)s)")
    g.add_argument("--window-batch", type=int, default=16,
                   help="windows per forward pass; lower it if memory runs out (default: %(default)s)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def add_image_args(parser: argparse.ArgumentParser) -> None:
    """Options on reading images (segment, eval, demo); :func:`apply_image_args` applies them."""
    parser.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                        help="decode images of up to N pixels; larger ones are refused as possible decompression "
                             "bombs (default: Pillow's limit, 89478485, e.g. 9459 x 9459); raise it for large "
                             "images you trust, e.g. --max-pixels 200000000")


def apply_image_args(args: argparse.Namespace) -> None:
    """Set the process-wide pixel limit (reaches the loader processes too) if --max-pixels was given."""
    if getattr(args, "max_pixels", None) is not None:
        from ..images import set_pixel_limit

        set_pixel_limit(args.max_pixels)


def config_from_args(args: argparse.Namespace, **preset):
    """A ProxyCLIPConfig from the parsed options; ``preset`` fills options left at None."""
    from ..model.clip import default_pretrained
    from ..model.segmenter import ProxyCLIPConfig

    def pick(name: str):
        value = getattr(args, name, None)
        return preset.get(name) if value is None else value

    short = pick("short_side")
    return ProxyCLIPConfig(
        clip=args.clip,
        clip_pretrained=default_pretrained(args.clip, args.clip_pretrained),
        vfm=args.vfm,
        method=args.method,
        beta=args.beta,
        gamma=args.gamma,
        attention=args.attention,
        alpha=args.alpha,
        window=pick("window"),
        stride=pick("stride"),
        bg_threshold=pick("bg_threshold"),
        short_side=short if short else None,
        long_side=pick("long_side"),
        window_batch=args.window_batch,
    )


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ProxyCLIPError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProxyCLIPError("CUDA was asked for but is not available; use --device cpu")
    return device


def resolve_dtype(precision: str, device):
    """The torch dtype of --precision on ``device`` (fp16 only on CUDA)."""
    import torch

    if precision == "fp16" and device.type != "cuda":
        raise ProxyCLIPError("fp16 needs a CUDA device; on the CPU use --precision bf16 or fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def build_model(args: argparse.Namespace, config):
    """Build the segmenter the options describe."""

    from ..model.segmenter import ProxyCLIP

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    return ProxyCLIP.build(
        config,
        clip_weights=args.clip_weights,
        vfm_weights=args.vfm_weights,
        random_weights=args.random_weights,
        device=device,
        dtype=dtype,
    )


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check that files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ProxyCLIPError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None


