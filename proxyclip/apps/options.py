"""Command-line options shared by the sub-commands: models, weights, method settings, device.

Exit codes of every command: 0 success; 1 some inputs failed (the others were processed); 2 bad
usage or configuration (class names, weights, output folder), nothing processed; 3 an output could
not be written (disk full, ...): the run stopped, what was written before is complete.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..errors import ProxyCLIPError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_WRITE = 0, 1, 2, 3
PRECISIONS = ("fp32", "fp16", "bf16")


# Help texts of the general inference settings (their defaults live in ProxyCLIPConfig).
GENERAL_SETTINGS = {
    "window": (int, "sliding-window size in pixels"),
    "stride": (int, "sliding-window stride in pixels"),
    "pad_multiple": (int, "windows smaller than --window are zero-padded up to a multiple of this many pixels "
                          "(1: run as they are)"),
    "bg_threshold": (float, "pixels whose top class probability is below this become class 0, the first class (0: off)"),
    "area_threshold": (float, "classes other than class 0 that win at most this fraction of the pixels not "
                              "given to class 0 are dropped from the image (SCLIP's area_thd; 0: off)"),
    "logit_scale": (float, "multiplies the cosine logits before the softmax over the class names"),
    "short_side": (int, "resize images so their short side is this many pixels, long side at most --long-side; "
                        "0 keeps the size"),
    "long_side": (int, "cap on the long side after resizing"),
    "window_batch": (int, "windows per forward pass; lower it if memory runs out (results unchanged)"),
}
PER_DATASET_HELP = "from the dataset preset"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose the models, their weights and the method (shared by every sub-command)."""
    from ..model.config import CLIP_MODELS, ProxyCLIPConfig
    from ..model.methods import METHODS

    default = ProxyCLIPConfig()
    g = parser.add_argument_group("models and weights")
    g.add_argument("--clip", default=default.clip, metavar="NAME",
                   help=f"open_clip ViT architecture (paper: {', '.join(CLIP_MODELS)}; default: %(default)s)")
    g.add_argument("--clip-pretrained", default=None, metavar="TAG",
                   help="open_clip pretrained tag; decides QuickGELU (default: "
                        + ", ".join(f"{tag} for {name}" for name, tag in CLIP_MODELS.items()) + ", else openai)")
    g.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="local CLIP checkpoint (.safetensors or a state dict) instead of downloading the tag's weights")
    g.add_argument("--vfm", default=default.vfm, type=vfm_key, metavar="NAME",
                   help="vision foundation model, for the methods that use one: a key of VFM_BUILDERS, "
                        "e.g. dino_vitb8, dino_vitb16, dinov2_vitb14_reg, sam_vitb, mae_vitb16 (default: %(default)s)")
    g.add_argument("--vfm-weights", default=None, metavar="FILE",
                   help="local VFM checkpoint (timm format, .safetensors or a state dict) instead of the hub")
    g.add_argument("--method", default=default.method, choices=list(METHODS), metavar="METHOD",
                   help="the training-free method: " + "; ".join(
                       f"{name} ({spec.title}{', with a VFM' if spec.needs_vfm else ''}): {spec.summary}"
                       for name, spec in METHODS.items()) + " (default: %(default)s)")
    g.add_argument("--random-weights", action="store_true",
                   help="build the real architectures with RANDOM weights (tests and benchmarks only: "
                        "the output is meaningless)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights (--random-weights): the same seed builds the same "
                        "weights, so runs are reproducible and resumable (default: %(default)s)")
    g.add_argument("--no-text-cache", action="store_true",
                   help="do not read or write text embeddings in the on-disk cache (PROXYCLIP_CACHE, "
                        "default ~/.cache/proxyclip)")
    g.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ... (default: %(default)s)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="model precision; fp16 needs CUDA, bf16 runs on CUDA and recent CPUs (default: %(default)s)")


def vfm_key(name: str) -> str:
    """``--vfm``'s type: a key of VFM_BUILDERS (checked when given, so that --help imports no torch)."""
    from ..model.vfm import VFM_BUILDERS

    if name not in VFM_BUILDERS:
        raise argparse.ArgumentTypeError(f"unknown VFM {name!r}; choose one of {', '.join(VFM_BUILDERS)}")
    return name


def add_inference_args(parser: argparse.ArgumentParser, per_dataset: tuple[str, ...] = ()) -> None:
    """The inference settings: general ones, and every method's options (from the registry).

    Every option defaults to None ("not given"): :func:`config_from_args` then takes the value from
    the dataset preset for the names in ``per_dataset``, else the method's default.
    """
    from dataclasses import MISSING, fields

    from ..model.config import ProxyCLIPConfig, method_defaults
    from ..model.methods import METHODS

    defaults = {f.name: f.default for f in fields(ProxyCLIPConfig)}
    g = parser.add_argument_group("inference settings")
    def by_method(name: str) -> str:  # the methods whose published settings differ from the default
        own = [f"{method} {spec.settings[name]}" for method, spec in METHODS.items() if name in spec.settings]
        return f"; {', '.join(own)}" if own else ""

    for name, (kind, text) in GENERAL_SETTINGS.items():
        shown = PER_DATASET_HELP if name in per_dataset else f"{defaults[name]}{by_method(name)}"
        g.add_argument(_flag(name), type=kind, default=None, help=f"{text} (default: {shown})")
    from ..model.refine import REFINERS

    g.add_argument("--refine", default=None, choices=["none", *sorted(REFINERS)],
                   help="post-processing of each image's logits at the output size, for any method: pamr (PAMR, "
                        "10 iterations, dilations 8 and 16, as NACLIP's published runs) or none "
                        f"(default: none{by_method('refine')})")
    m = parser.add_argument_group("method options (each applies to the methods that name it)")
    options: dict[str, dict] = {}  # option name -> {help, choices, type, defaults by method}
    for method, spec in METHODS.items():
        method_default = method_defaults(method)
        for f in fields(spec.options):
            entry = options.setdefault(f.name, {"help": f.metadata.get("help", ""), "choices": f.metadata.get("choices"),
                                                "type": type(f.default) if f.default is not MISSING else str,
                                                "defaults": {}})
            entry["defaults"][method] = method_default[f.name]
    for name, entry in options.items():
        shown = ", ".join(f"{method} {value}" for method, value in entry["defaults"].items())
        kind = entry["type"] if entry["type"] in (int, float, str) else str
        m.add_argument(_flag(name), type=kind, default=None, choices=entry["choices"],
                       help=f"{entry['help']} (default: {shown})")


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
    """A ProxyCLIPConfig from the parsed options: explicit options over ``preset`` (a partial
    inference config, e.g. a dataset's) over the method's defaults."""
    from ..model.config import ProxyCLIPConfig
    from ..model.methods import get_method

    spec = get_method(args.method)
    settings = {k: v for k, v in preset.items() if v is not None}
    settings.update(explicit_settings(args))
    given = {name for name in _all_option_names() if getattr(args, name, None) is not None}
    stray = sorted(given - set(spec.option_names()))
    if stray:
        raise ProxyCLIPError(f"{', '.join(_flag(n) for n in stray)} does not apply to method {args.method!r} "
                             f"(its options: {', '.join(_flag(n) for n in spec.option_names()) or 'none'})")
    settings.update({name: getattr(args, name) for name in given})
    if settings.get("short_side") == 0:
        settings["short_side"] = None
    return ProxyCLIPConfig.create(clip=args.clip, clip_pretrained=args.clip_pretrained, vfm=args.vfm,
                                  method=args.method, **settings)


def explicit_settings(args: argparse.Namespace) -> dict:
    """The general inference settings given on the command line (not the method's options)."""
    return {name: getattr(args, name) for name in (*GENERAL_SETTINGS, "refine") if getattr(args, name, None) is not None}


def _all_option_names() -> set[str]:
    from ..model.methods import METHODS

    return {name for spec in METHODS.values() for name in spec.option_names()}


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
    if args.random_weights:  # the same --seed builds the same weights: reproducible, resumable runs
        import torch

        torch.manual_seed(getattr(args, "seed", 0))
    return ProxyCLIP.build(
        config,
        clip_weights=args.clip_weights,
        vfm_weights=args.vfm_weights,
        random_weights=args.random_weights,
        device=device,
        dtype=dtype,
        progress=say,
    )


def say(line: str) -> None:
    """A progress line on stderr (the commands' results go to stdout)."""
    print(f"proxyclip: {line}", file=sys.stderr, flush=True)


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check that files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ProxyCLIPError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None


