"""``proxyclip segment``: label maps, overlays, probabilities and COCO masks for your own images, from
one photo to millions.

- Inputs are image files, folders (``--recursive`` descends into sub-folders) and list files
  (``--list FILE``, one path a line), read as a stream: nothing per image is kept beyond a
  64-bit hash of its output name (to refuse two images that would write the same files).
- Images are decoded and resized in ``--workers`` background processes; the windows of
  ``--batch-images`` images share forward passes (:meth:`ProxyCLIP.predict_logits_batch`).
- Outputs are written atomically, so an existing output is a complete one: a run started again
  skips the images whose outputs all exist (``--overwrite`` redoes them).
- Under ``torchrun`` image i goes to process i % WORLD_SIZE, as in ``eval``; each process appends
  one JSON line per image to ``OUT/manifest-rankR.jsonl``.
- A write error (a full disk) stops the run at once, naming the file (exit code 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError, ProxyCLIPError
from ..loading import default_workers
from .options import (
    EXIT_OK,
    EXIT_PARTIAL,
    add_image_args,
    add_inference_args,
    add_model_args,
    build_model,
    config_from_args,
    ensure_writable_dir,
    say,
)

# ---- outputs --------------------------------------------------------------------------------------

def coco_masks(labels, names: Sequence[str]) -> list[dict]:
    """Per class present in ``labels`` (H x W ints): index, name, area in pixels and as a fraction, and
    its mask as COCO run-length encoding (pycocotools ``mask.encode``; ``counts`` as a str)."""
    import numpy as np

    mask_utils = _pycocotools_mask()
    present, counts = np.unique(labels, return_counts=True)
    out = []
    for c, area in zip(present.tolist(), counts.tolist()):
        rle = mask_utils.encode(np.asfortranarray(labels == c, dtype=np.uint8))  # H x W, Fortran order
        out.append({"index": c, "name": names[c], "area": area, "fraction": area / labels.size,
                    "rle": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}})
    return out


def output_kinds(args: argparse.Namespace) -> tuple[str, ...]:
    """The outputs each image gets (keys of :data:`proxyclip.image_stream.OUTPUT_SUFFIXES`)."""
    wanted = {"labels": True, "overlay": not args.no_overlay, "probs": args.save_probs, "json": args.save_json}
    return tuple(kind for kind, on in wanted.items() if on)


def _pycocotools_mask():
    try:
        from pycocotools import mask
    except ImportError:
        raise ProxyCLIPError("--save-json needs pycocotools: pip install 'proxyclip[coco]'") from None
    return mask


class Manifest:
    """``OUT/manifest-rankR.jsonl``: one JSON line per image seen by this process, appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fh = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {path.name} in {path.parent}: {exc.strerror or exc}") from None

    def write(self, record: dict) -> None:
        try:
            self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.fh.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path.name} in {self.path.parent}: {exc.strerror or exc}") from None

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass


# ---- the command ----------------------------------------------------------------------------------

def add_segment_parser(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images into named classes",
        description="Segment images into any classes you name. For each image, writes into --out: NAME.png "
                    "(palette label map: pixel value = class index), NAME_overlay.png (colours and a legend), and "
                    "on request NAME_probs.npy (C x H x W float32 class probabilities) and NAME.json (per class "
                    "present: area and mask as COCO RLE). Images in folders keep their relative path under --out. "
                    "A run started again skips images whose outputs all exist; OUT/manifest-rank0.jsonl lists "
                    "every image with its outputs, classes present and time. Under torchrun "
                    "(torchrun --nproc_per_node=G -m proxyclip segment ...) the images are shared out.",
    )
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files (JPEG, PNG, TIFF, WebP, ...) or folders of them")
    p.add_argument("--list", action="append", default=[], metavar="FILE", dest="lists",
                   help="a text file naming images, one path a line (relative paths: to the file's folder); "
                        "outputs keep the path as written; repeatable")
    p.add_argument("--recursive", "-r", action="store_true", help="also the images in sub-folders of folders")
    cls = p.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", metavar="LIST",
                     help='class names separated by commas, synonyms of one class by semicolons: "cat; kitten, dog, sky"')
    cls.add_argument("--classes-file", metavar="FILE",
                     help='a text file with one class a line, synonyms separated by "; "')
    p.add_argument("--out", "-o", default="proxyclip_out", type=Path, help="output folder (default: %(default)s)")
    p.add_argument("--save-probs", action="store_true", help="also save the class probabilities as NAME_probs.npy")
    p.add_argument("--save-json", action="store_true",
                   help="also save NAME.json: each present class's index, name, area (pixels, fraction) and mask "
                        "as COCO RLE (needs pycocotools)")
    p.add_argument("--no-overlay", action="store_true", help="do not write the colour overlay")
    p.add_argument("--overwrite", action="store_true",
                   help="segment every image again, even those whose outputs exist (default: skip them)")
    p.add_argument("--batch-images", type=int, default=1, metavar="N",
                   help="run the windows of N images together (fills a GPU; results unchanged; default: %(default)s)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that read and resize images while the model runs (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(p)
    add_image_args(p)
    add_inference_args(p)
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    from ..classes import parse_classes, read_class_file
    from ..evaluation.distributed import init_distributed
    from ..image_stream import ImageStream, InputSpec, count_and_check, output_paths
    from ..images import classes_by_area, label_image, overlay_image, write_atomically
    from ..loading import make_loader
    from ..progress import CountBar
    from .options import resolve_device

    if args.batch_images < 1 or args.workers < 0:
        raise ProxyCLIPError("--batch-images must be at least 1 and --workers 0 or more")
    classes = read_class_file(args.classes_file) if args.classes_file else parse_classes(args.classes)
    spec = InputSpec(tuple(args.images), tuple(args.lists), args.recursive, os.path.realpath(args.out))
    total = count_and_check(spec)  # every input listed and checked before the models load
    device = resolve_device(args.device)
    dist = init_distributed(device.type)
    if dist.world > 1 and device.type == "cuda":
        args.device = f"cuda:{dist.local_rank}"
    try:
        if args.save_json:
            _pycocotools_mask()  # missing: say so before anything runs
        mine = len(range(dist.rank, total, dist.world))
        model = build_model(args, config_from_args(args))  # missing weights stop the run before the folder is made
        ensure_writable_dir(args.out)
        text = model.encode_classes(classes, CountBar("encoding class names", "name", disable=args.no_progress))
        cfg = model.config
        kinds = output_kinds(args)
        dataset = ImageStream(spec, args.out, kinds, overwrite=args.overwrite, short_side=cfg.short_side,
                              long_side=cfg.long_side, keep_image=not args.no_overlay, rank=dist.rank,
                              world=dist.world)
        loader = make_loader(dataset, min(args.workers, max(mine - 1, 0)))
        normalise = model.with_config(short_side=None)  # the workers resized already
        names = classes.display_names
        manifest = Manifest(args.out / f"manifest-rank{dist.rank}.jsonl")
        counts = {"ok": 0, "skipped": 0, "error": 0}
        say(f"segmenting {mine} images" + (f" (process {dist.rank} of {dist.world}, {total} in all)"
                                           if dist.world > 1 else "") + f" into {len(classes)} classes")
        from tqdm import tqdm

        bar = tqdm(total=mine, unit="img", file=sys.stderr, dynamic_ncols=True,
                   disable=args.no_progress or dist.rank != 0 or mine < 2)
        pending: list[dict] = []

        def finish(item: dict, status: str, **fields) -> None:
            counts[status] += 1
            manifest.write({"input": item["input"].path, "status": status, **fields})
            bar.update(1)

        def flush() -> None:
            if not pending:
                return
            start = time.perf_counter()
            pixels = [normalise.preprocess(it["resized"]) for it in pending]  # 3 x h x w each
            all_logits = model.predict_logits_batch(pixels, text)  # Q x h x w each
            shared = (time.perf_counter() - start) / len(pending)
            for it, logits in zip(pending, all_logits):
                start = time.perf_counter()
                paths = output_paths(args.out, it["input"].key, kinds)
                labels, probs = model.classify_at_size(logits, tuple(it["size"]), classes, args.save_probs)
                files: dict[Path, object] = {paths["labels"]: label_image(labels, len(classes))}
                if "overlay" in paths:
                    files[paths["overlay"]] = overlay_image(it["image"], labels, names)
                if "probs" in paths:
                    files[paths["probs"]] = probs
                if "json" in paths:
                    height, width = labels.shape
                    files[paths["json"]] = json.dumps({"image": it["input"].path, "height": height, "width": width,
                                                       "classes": coco_masks(labels, names)}, ensure_ascii=False) + "\n"
                write_atomically(files)  # a write error stops the run (OutputError)
                present = [names[c] for c, _ in classes_by_area(labels)]
                finish(it, "ok", outputs=[str(p.relative_to(args.out)) for p in files],
                       size=[int(it["size"][1]), int(it["size"][0])], classes=present,
                       seconds=round(shared + time.perf_counter() - start, 3))
            pending.clear()

        try:
            for item in loader:
                if item.get("skipped"):
                    paths = output_paths(args.out, item["input"].key, kinds).values()
                    finish(item, "skipped", outputs=[str(p.relative_to(args.out)) for p in paths])
                elif "error" in item:
                    tqdm.write(f"proxyclip: error: {item['error']}", file=sys.stderr)
                    finish(item, "error", error=item["error"])
                else:
                    pending.append(item)
                    if len(pending) >= args.batch_images:
                        flush()
            flush()
        finally:
            bar.close()
            manifest.close()
    finally:
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    where = f"process {dist.rank}: " if dist.world > 1 else ""
    skipped = f", {counts['skipped']} skipped (outputs exist; --overwrite redoes them)" if counts["skipped"] else ""
    failed = f", {counts['error']} failed" if counts["error"] else ""
    print(f"{where}segmented {counts['ok']} of {mine} images into {len(classes)} classes{skipped}{failed}; "
          f"outputs in {args.out}", file=sys.stderr)
    return EXIT_PARTIAL if counts["error"] else EXIT_OK
