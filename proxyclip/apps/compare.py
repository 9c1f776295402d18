"""``proxyclip compare``: the same images under several methods or configurations, side by side
(the qualitative figures 5, 6 and 7 of the paper)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ProxyCLIPError
from .options import EXIT_OK, EXIT_PARTIAL, add_model_args, ensure_writable_dir


def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="segment images with several methods or configurations, side by side",
        description="For each image, OUT/NAME_compare.png: the image, then one overlay (with its legend) per method "
                    "or configuration, titled. --methods lists methods on the models of the model options; --config "
                    "adds configurations with their own settings, e.g. --config 'proxyclip vfm=dino_vitb16' "
                    "--config 'proxyclip clip=ViT-H-14' (Figs. 6 and 7 of the paper).",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMG", help="image files")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help='class names, comma-separated; synonyms separated by "; "')
    names.add_argument("--classes-file", type=Path, metavar="FILE", help="class names, one a line")
    p.add_argument("--methods", default="clip,maskclip,proxyclip", metavar="LIST",
                   help="comma-separated methods (default: %(default)s)")
    p.add_argument("--config", action="append", default=[], metavar="'METHOD KEY=VALUE ...'",
                   help="a configuration: a method and settings (clip, clip_pretrained, vfm, the method's options, "
                        "window, ...); repeat for several")
    p.add_argument("--out", "-o", type=Path, default=Path("proxyclip_compare"), help="output folder (default: %(default)s)")
    add_model_args(p)
    p.set_defaults(func=run_compare)


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_configurations(methods: str, configs: list[str]) -> list[tuple[str, dict]]:
    """(title, settings) for each column: the methods, then the --config entries."""
    out = [(m.strip(), {"method": m.strip()}) for m in methods.split(",") if m.strip()]
    for entry in configs:
        words = entry.split()
        if not words:
            raise ProxyCLIPError("--config takes 'METHOD KEY=VALUE ...', got an empty string")
        settings = {"method": words[0]}
        for word in words[1:]:
            if "=" not in word:
                raise ProxyCLIPError(f"--config {entry!r}: write KEY=VALUE, got {word!r}")
            key, value = word.split("=", 1)
            settings[key.replace("-", "_")] = _value(value)
        out.append((entry, settings))
    if not out:
        raise ProxyCLIPError("nothing to compare: give --methods or --config")
    return out


def run_compare(args: argparse.Namespace) -> int:
    from ..classes import parse_classes, read_class_file
    from ..evaluation.figures import compare_panels
    from ..images import load_image, write_atomically
    from ..model.config import WEIGHT_FIELDS, ProxyCLIPConfig
    from .options import build_model

    classes = read_class_file(args.classes_file) if args.classes_file else parse_classes(args.classes)
    columns = parse_configurations(args.methods, args.config)
    base = {"clip": args.clip, "clip_pretrained": args.clip_pretrained, "vfm": args.vfm}
    configs = []
    for title, settings in columns:
        try:
            configs.append((title, ProxyCLIPConfig.create(**{**base, **settings})))
        except (ProxyCLIPError, TypeError) as exc:
            raise ProxyCLIPError(f"{title}: {exc}") from None
    ensure_writable_dir(args.out)
    models: dict[tuple, object] = {}  # models built once per weights; the others switch settings
    segmenters = []
    for title, config in configs:
        key = tuple(config.weights().values())
        if key not in models:
            models[key] = build_model(args, config)
        changes = {k: v for k, v in vars(config).items() if k not in WEIGHT_FIELDS}
        segmenters.append((title, models[key].with_config(**changes)))
    failed = 0
    for path in args.images:
        try:
            image = load_image(path)
        except ProxyCLIPError as exc:
            print(f"proxyclip: {exc}", file=sys.stderr)
            failed += 1
            continue
        labelings = [(title, model.segment(image, classes).labels) for title, model in segmenters]
        names = list(classes.display_names)
        target = args.out / f"{path.stem}_compare.png"
        write_atomically({target: compare_panels(image, labelings, names)})
        print(f"{path} -> {target}", file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK
