"""``proxyclip segment``: label maps, overlays and probabilities for your own images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ProxyCLIPError
from .options import (
    EXIT_OK,
    EXIT_PARTIAL,
    add_image_args,
    add_inference_args,
    add_model_args,
    build_model,
    config_from_args,
    ensure_writable_dir,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Folders become the image files directly inside them (sorted); files stay as given."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ProxyCLIPError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        else:
            out.append(item)
    return out


def add_segment_parser(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images into named classes",
        description="Segment images into any classes you name. For each IMAGE, writes into --out: "
                    "NAME.png (palette label map: pixel value = class index), NAME_overlay.png (colours and a "
                    "legend) and, with --save-probs, NAME_probs.npy (C x H x W float32 class probabilities).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (JPEG, PNG, TIFF, WebP, ...) or folders of them")
    cls = p.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", metavar="LIST",
                     help='class names separated by commas, synonyms of one class by semicolons: "cat; kitten, dog, sky"')
    cls.add_argument("--classes-file", metavar="FILE",
                     help='a text file with one class a line, synonyms separated by "; "')
    p.add_argument("--out", "-o", default="proxyclip_out", type=Path, help="output folder (default: %(default)s)")
    p.add_argument("--save-probs", action="store_true", help="also save the class probabilities as NAME_probs.npy")
    p.add_argument("--no-overlay", action="store_true", help="do not write the colour overlay")
    add_model_args(p)
    add_image_args(p)
    add_inference_args(p)
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..classes import parse_classes, read_class_file
    from ..images import label_image, load_image, overlay_image, write_atomically

    classes = read_class_file(args.classes_file) if args.classes_file else parse_classes(args.classes)
    args.images = expand_inputs(args.images)
    stems: dict[str, str] = {}
    for image in args.images:
        stem = Path(image).stem
        if stem in stems:
            raise ProxyCLIPError(f"{stems[stem]} and {image} would write the same output names; segment them in separate runs")
        stems[stem] = image
    model = build_model(args, config_from_args(args))  # missing weights stop the run before the folder is made
    ensure_writable_dir(args.out)
    failed = 0
    bar = tqdm(args.images, unit="img", disable=len(args.images) < 2, file=sys.stderr)
    for image in bar:
        try:
            pixels = load_image(image)
            result = model.segment(pixels, classes, return_probs=args.save_probs)
            stem = Path(image).stem
            outputs: dict[Path, object] = {args.out / f"{stem}.png": label_image(result.labels, len(classes))}
            if not args.no_overlay:
                outputs[args.out / f"{stem}_overlay.png"] = overlay_image(pixels, result.labels, classes.display_names)
            if args.save_probs:
                outputs[args.out / f"{stem}_probs.npy"] = result.probs
            write_atomically(outputs)
        except (ProxyCLIPError, OSError) as exc:
            failed += 1
            tqdm.write(f"proxyclip: error: {exc}", file=sys.stderr)
    done = len(args.images) - failed
    print(f"segmented {done} of {len(args.images)} images into {len(classes)} classes; outputs in {args.out}",
          file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


