"""``proxyclip eval``, ``proxyclip presets`` and ``proxyclip prepare``: the command line of :mod:`proxyclip.evaluation`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..classes import read_class_file
from ..errors import ProxyCLIPError
from ..evaluation.datasets import SegmentationDataset, coco_object_jobs, convert_coco_object_label
from ..evaluation.presets import (
    DATASET_SETTINGS,
    PRESETS,
    PROTOCOLS,
    TABLE1_LARGE,
    TABLE1_MAIN,
    DatasetPreset,
    get_preset,
    load_preset,
    preset_to_json,
)
from ..loading import default_workers
from .options import (
    EXIT_OK,
    add_image_args,
    add_inference_args,
    add_model_args,
    build_model,
    config_from_args,
    ensure_writable_dir,
    explicit_settings,
    resolve_device,
)


def add_eval_parsers(sub) -> None:
    """Register ``eval``, ``presets`` and ``prepare`` on the ``proxyclip`` command."""

    p = sub.add_parser(
        "eval",
        help="evaluate on a benchmark (mIoU as MMSegmentation computes it)",
        description="Evaluate on prepared benchmark datasets with the published protocol of each (class names, "
                    "threshold, resize rule, window; see `proxyclip presets`). Writes OUT/DATASET-CONFIG.json and "
                    ".md; several datasets also give OUT/table1.md and .json in the layout of the paper's Table 1, "
                    "one row per configuration found in OUT. Killed runs resume from OUT/.state. For several GPUs "
                    "or machines run it under torchrun: torchrun --nproc_per_node=G -m proxyclip eval ...",
    )
    p.add_argument("--dataset", required=True, metavar="NAME",
                   help=f"a preset ({', '.join(PRESETS)}), a comma-separated list of them, 'all' (the ones given "
                        "in --roots/--roots-file), 'custom' (with --images, --labels, --classes-file), or a preset "
                        "JSON file (see `proxyclip presets KEY --json`)")
    p.add_argument("--root", type=Path, metavar="PATH", help="the dataset root (one dataset)")
    p.add_argument("--roots", nargs="+", default=[], metavar="KEY=PATH",
                   help="dataset roots for several datasets, e.g. voc21=data/VOCdevkit/VOC2012 ade20k=data/ADEChallengeData2016")
    p.add_argument("--roots-file", type=Path, metavar="FILE",
                   help='a JSON object {"voc21": "PATH", ...} or lines "voc21 = PATH" naming dataset roots')
    p.add_argument("--published-ignore", action="store_true",
                   help="ADE847 / Context459: ignore label 255 as the published runs did (class 255 dropped, ADE847's "
                        "void pixels counted) instead of the correct 65535")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images of each dataset")
    p.add_argument("--out", "-o", type=Path, default=Path("proxyclip_eval"),
                   help="output folder for results, saved progress and predictions (default: %(default)s)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that load and resize images while the model runs (default: %(default)s)")
    p.add_argument("--batch-images", type=int, default=1, metavar="N",
                   help="run the windows of N images together (fills a GPU; results unchanged; default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=20, metavar="N",
                   help="save progress every N images (default: %(default)s)")
    p.add_argument("--restart", action="store_true", help="ignore saved progress and start over")
    p.add_argument("--save-predictions", action="store_true", help="write label maps to OUT/predictions/DATASET/ID.png")
    p.add_argument("--save-overlays", action="store_true", help="write colour overlays to OUT/overlays/DATASET/ID.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = p.add_argument_group("your own dataset (--dataset custom)")
    c.add_argument("--images", type=Path, metavar="DIR", help="folder of images (searched recursively)")
    c.add_argument("--labels", type=Path, metavar="DIR",
                   help="folder of label PNGs: same relative names, pixel value = line number in --classes-file - 1")
    c.add_argument("--classes-file", type=Path, metavar="FILE",
                   help='class names, one a line, synonyms separated by "; " (also replaces a preset\'s names)')
    c.add_argument("--image-suffix", default=".jpg", help="image file ending (default: %(default)s)")
    c.add_argument("--label-suffix", default=".png", help="label file ending (default: %(default)s)")
    c.add_argument("--split", type=Path, metavar="FILE", help="evaluate only the ids listed in FILE (one a line)")
    c.add_argument("--ignore-index", type=int, default=255, help="label value left out of scoring (default: %(default)s)")
    c.add_argument("--reduce-zero-label", action="store_true", help="label 0 is ignored, the others shift down by one")
    add_model_args(p)
    add_image_args(p)
    p.add_argument("--protocol", choices=PROTOCOLS, default="method",
                   help="per-dataset settings (background threshold, ...) where a method's published runs differ from "
                        "the dataset preset: 'method' uses the method's own, 'dataset' the preset's (ProxyCLIP's "
                        "protocol); options given on the command line win over both; the result records which "
                        "(default: %(default)s)")
    add_inference_args(p, per_dataset=DATASET_SETTINGS)
    p.set_defaults(func=run_eval)

    q = sub.add_parser(
        "presets",
        help="list the dataset presets, or print one as JSON to copy",
        description="Without KEY, a table of the built-in dataset presets. With KEY, the preset as JSON (--json) "
                    "or its class names (--classes): save it, edit it and pass the file to `proxyclip eval --dataset`.",
    )
    q.add_argument("key", nargs="?", metavar="KEY", help="a preset name")
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the preset as JSON (the default with KEY)")
    fmt.add_argument("--classes", action="store_true", help="print the preset's class-names file")
    q.set_defaults(func=run_presets)

    r = sub.add_parser(
        "prepare",
        help="convert datasets into the layouts the presets read",
        description="coco-object: write COCO-Object labels (ROOT/annotations/*/ID_instanceTrainIds.png: 0 background, "
                    "1..80 things) from a prepared COCO-Stuff 164k ROOT (its *_labelTrainIds.png, or the raw maps), as "
                    "the published converter did: unlabeled pixels (255) become background.",
    )
    r.add_argument("target", choices=["coco-object"], help="what to prepare")
    r.add_argument("root", type=Path, metavar="COCO_STUFF_ROOT", help="the COCO-Stuff 164k root (holds images/ and annotations/)")
    r.add_argument("--overwrite", action="store_true", help="rewrite label maps that exist already")
    r.set_defaults(func=run_prepare)


def _read_roots(args: argparse.Namespace) -> dict[str, Path]:
    roots: dict[str, Path] = {}
    if args.roots_file:
        try:
            text = args.roots_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProxyCLIPError(f"cannot read roots file {args.roots_file}: {exc.strerror or exc}") from None
        try:
            pairs = json.loads(text)
            if not isinstance(pairs, dict):
                raise ProxyCLIPError(f"roots file {args.roots_file}: the JSON must be an object {{\"voc21\": \"PATH\"}}")
            items = list(pairs.items())
        except json.JSONDecodeError:
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if "=" not in line:
                    raise ProxyCLIPError(f"roots file {args.roots_file}, line {n}: write KEY = PATH") from None
                key, value = line.split("=", 1)
                items.append((key.strip(), value.strip()))
        base = args.roots_file.parent
        for key, value in items:
            path = Path(str(value)).expanduser()
            roots[get_preset(key).key] = path if path.is_absolute() else base / path
    for pair in args.roots:
        if "=" not in pair:
            raise ProxyCLIPError(f"--roots takes KEY=PATH pairs, got {pair!r}")
        key, value = pair.split("=", 1)
        roots[get_preset(key).key] = Path(value).expanduser()
    return roots


def _datasets_from_args(args: argparse.Namespace) -> list[tuple[DatasetPreset, Path, Path | None]]:
    """(preset, root, split override) for each dataset the options name."""
    name = args.dataset.strip()
    split = args.split
    if name.lower() == "custom":
        missing = [o for o, v in (("--images", args.images), ("--labels", args.labels),
                                  ("--classes-file", args.classes_file)) if v is None]
        if missing:
            raise ProxyCLIPError(f"--dataset custom needs {', '.join(missing)}")
        preset = DatasetPreset(
            key="custom", title="custom", classes_file=str(args.classes_file.resolve()),
            num_classes=len(read_class_file(args.classes_file, unique=False)),
            image_dir=str(args.images.resolve()), label_dir=str(args.labels.resolve()),
            image_suffix=args.image_suffix, label_suffix=args.label_suffix,
            reduce_zero_label=args.reduce_zero_label, ignore_index=args.ignore_index,
            label_dtype="uint16",
        )
        return [(preset, Path("/"), split)]
    if name.lower().endswith(".json") or Path(name).is_file():
        preset = load_preset(name)
        if args.root is None:
            raise ProxyCLIPError(f"--dataset {name} needs --root PATH (the folder its image_dir and label_dir lie in)")
        return [(_with_classes(preset, args), args.root, split)]
    roots = _read_roots(args)
    if name.lower() == "all":
        if not roots:
            raise ProxyCLIPError("--dataset all needs dataset roots: --roots voc21=PATH ... or --roots-file FILE")
        keys = [k for k in (*TABLE1_MAIN, *TABLE1_LARGE) if k in roots]
    else:
        keys = [get_preset(k).key for k in name.split(",") if k.strip()]
    if len(keys) == 1 and args.root is not None:
        roots[keys[0]] = args.root
    elif args.root is not None:
        raise ProxyCLIPError("--root names one dataset's root; for several use --roots KEY=PATH ... or --roots-file")
    missing = [k for k in keys if k not in roots]
    if missing:
        raise ProxyCLIPError(f"no root given for {', '.join(missing)}: use --root PATH (one dataset) or --roots KEY=PATH")
    if split is not None and len(keys) > 1:
        raise ProxyCLIPError("--split applies to one dataset; evaluate the datasets one at a time")
    return [(_with_classes(get_preset(k), args), roots[k], split) for k in keys]


def _with_classes(preset: DatasetPreset, args: argparse.Namespace) -> DatasetPreset:
    if args.classes_file is None:
        return preset
    return replace(preset, classes_file=str(args.classes_file.resolve()))


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.distributed import init_distributed
    from ..evaluation.report import _fmt, collect_results, table1
    from ..evaluation.runner import RunOptions, dataset_settings, evaluate, preset_config
    from ..images import write_atomically

    if args.limit is not None and args.limit < 1:
        raise ProxyCLIPError("--limit must be at least 1")
    if args.workers < 0 or args.checkpoint_every < 1 or args.batch_images < 1:
        raise ProxyCLIPError("--workers must be 0 or more, --checkpoint-every and --batch-images at least 1")
    jobs = _datasets_from_args(args)
    datasets = [SegmentationDataset(preset, root, published_ignore=args.published_ignore, split_file=split)
                for preset, root, split in jobs]  # check every root before loading any model
    ensure_writable_dir(args.out)
    device = resolve_device(args.device)
    dist = init_distributed(device.type)
    if dist.world > 1 and device.type == "cuda":
        args.device = f"cuda:{dist.local_rank}"
    overrides = explicit_settings(args)
    run = RunOptions(out_dir=args.out, limit=args.limit, workers=args.workers, resume=not args.restart,
                     checkpoint_every=args.checkpoint_every, batch_images=args.batch_images,
                     save_predictions=args.save_predictions, save_overlays=args.save_overlays,
                     progress=not args.no_progress)
    model = provenance = None
    try:
        for data in datasets:
            if model is None:
                first = dataset_settings(args.method, data.preset, protocol=args.protocol)
                model = build_model(args, config_from_args(args, **{k: first[k] for k in DATASET_SETTINGS}))
                provenance = run_provenance(args, model)
            model = preset_config(model, data.preset, overrides, args.protocol)
            result = evaluate(model, data, run, dist=dist, overrides=overrides, protocol=args.protocol,
                              provenance=provenance)
            if dist.rank == 0:
                m = result["metrics"]
                print(f"{data.preset.key}: mIoU {_fmt(m['mIoU'])}  aAcc {_fmt(m['aAcc'])}  mAcc {_fmt(m['mAcc'])}  "
                      f"({result['num_images']} images) -> {args.out / (data.preset.key + '-' + result['config_id'])}.json",
                      file=sys.stderr)
        if dist.rank == 0 and len(datasets) > 1:
            markdown, rows = table1(collect_results(args.out))
            write_atomically({args.out / "table1.md": markdown,
                              args.out / "table1.json": json.dumps(rows, indent=1) + "\n"})
            print(markdown, end="")
    finally:
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return EXIT_OK


def run_provenance(args: argparse.Namespace, model) -> dict:
    """What produces an evaluation's numbers, for its result file: the weights (random with their seed,
    or each file with its sha256, or the hub repository and revision), device, precision and versions."""
    import open_clip
    import timm
    import torch

    from .. import __version__
    from ..model.hub import clip_source, describe_source, vfm_source

    cfg = model.config
    if args.random_weights:
        weights: dict = {"random": True, "seed": args.seed}
    else:
        weights = {"clip": describe_source(clip_source(cfg.clip, cfg.clip_pretrained, args.clip_weights))}
        if cfg.needs_vfm:
            weights["vfm"] = describe_source(vfm_source(cfg.vfm, args.vfm_weights))
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"weights": weights, "device": str(device), "device_name": name, "precision": args.precision,
            "versions": {"proxyclip": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                         "timm": timm.__version__}}


def run_presets(args: argparse.Namespace) -> int:

    if args.key is None:
        head = ("key", "classes", "threshold", "short side", "window/stride", "labels", "ignore", "images / labels")
        rows = []
        for p in PRESETS.values():
            mapping = "reduce zero" if p.reduce_zero_label else p.label_dtype
            ignore = f"{p.ignore_index}" + (f" (published {p.published_ignore_index})" if p.published_ignore_index else "")
            rows.append((p.key, str(p.num_classes), f"{p.setting('bg_threshold'):g}", str(p.setting("short_side")),
                         f"{p.setting('window')}/{p.setting('stride')}",
                         mapping, ignore, f"{p.image_dir} / {p.label_dir}"))
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        for r in (head, *rows):
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print("\n`proxyclip presets KEY` prints one as JSON to copy and edit; class names: `proxyclip presets KEY --classes`")
        return EXIT_OK
    preset = get_preset(args.key)
    if args.classes:
        print(preset.classes_path().read_text(encoding="utf-8"), end="")
    else:
        print(preset_to_json(preset), end="")
    return EXIT_OK


def run_prepare(args: argparse.Namespace) -> int:
    from tqdm import tqdm


    jobs = coco_object_jobs(args.root)
    todo = [job for job in jobs if args.overwrite or not job[1].exists()]
    for source, target, kind in tqdm(todo, unit="label", desc="coco-object", file=sys.stderr):
        convert_coco_object_label(source, target, kind)
    print(f"coco-object: wrote {len(todo)} label maps ({len(jobs) - len(todo)} existed already) under "
          f"{args.root / 'annotations'}", file=sys.stderr)
    return EXIT_OK
