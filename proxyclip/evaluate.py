"""Benchmark evaluation: ``proxyclip eval``, ``proxyclip presets`` and ``proxyclip prepare``.

Per image, exactly what :meth:`ProxyCLIP.segment` does: load RGB, resize by the preset's rule,
sliding-window logits resized to the original size, classify; then count the per-class areas
against the ground truth at the original size (:mod:`proxyclip.metrics`).

Images are read and resized in DataLoader workers while the model runs. Runs are resumable:
each process keeps its finished image indices and their summed areas in a state file under
``OUT/.state`` (written atomically every ``checkpoint_every`` images and when stopped), keyed by a
fingerprint of the model, its settings and the dataset; a restarted run skips what is done.
As the sums are integers, the final numbers equal those of an uninterrupted run.

Under ``torchrun`` (WORLD_SIZE > 1) image i goes to process i % WORLD_SIZE; the areas are summed
with all_reduce and process 0 writes the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .datasets import DatasetError, SegmentationDataset
from .errors import ProxyCLIPError
from .images import write_atomically
from .metrics import AREA_ROWS, intersect_and_union, summarize
from .presets import PRESETS, TABLE1_LARGE, TABLE1_MAIN, DatasetPreset, get_preset, load_preset, preset_to_json

if TYPE_CHECKING:
    from .segmenter import ProxyCLIP

RESULT_KIND = "proxyclip-eval-result"
_PER_DATASET = ("window", "stride", "short_side", "long_side", "bg_threshold")  # settings that come from the preset


def _settings(model: ProxyCLIP) -> dict:
    """Every setting that decides the numbers (window_batch only decides memory)."""
    return {k: v for k, v in asdict(model.config).items() if k != "window_batch"}


# ---- processes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """This process's place among the evaluating processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without WORLD_SIZE > 1 this is a single process. The backend is NCCL for CUDA, else Gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum an int64 tensor over all processes (a no-op for one process)."""
    if info.world == 1:
        return tensor
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = tensor.to(device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


# ---- data loading in workers --------------------------------------------------------------------

class _Items(torch.utils.data.Dataset):
    """Sample ``indices[k]``: resized RGB for the model, the original labels (and image)."""

    def __init__(self, data: SegmentationDataset, indices: Sequence[int], short_side: int | None,
                 long_side: int, keep_image: bool) -> None:
        self.data, self.indices = data, list(indices)
        self.short_side, self.long_side, self.keep_image = short_side, long_side, keep_image

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        from .images import load_image, resize_keep_ratio

        index = self.indices[k]
        sample = self.data.samples[index]
        try:
            image = load_image(sample.image)  # H x W x 3 uint8
            label = self.data.read_label(sample.label)  # H x W int64
        except ProxyCLIPError as exc:
            return {"index": index, "error": str(exc)}
        if label.shape != image.shape[:2]:
            return {"index": index, "error": f"{sample.label}: label size {label.shape[1]}x{label.shape[0]} differs "
                                             f"from image {sample.image} ({image.shape[1]}x{image.shape[0]})"}
        resized = torch.tensor(image).permute(2, 0, 1)  # 3 x H x W uint8
        if self.short_side is not None:  # the resize of ProxyCLIP.preprocess, done here in the worker
            resized = resize_keep_ratio(resized, self.short_side, self.long_side)
        return {"index": index, "error": None, "resized": resized.permute(1, 2, 0).numpy(),  # h x w x 3 uint8
                "label": torch.from_numpy(label), "image": image if self.keep_image else None}


def _identity(item: dict) -> dict:
    return item


def default_workers() -> int:
    """Loader processes: min(4, CPU count)."""
    return min(4, os.cpu_count() or 1)


# ---- run identity and state -------------------------------------------------------------------------

def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of the model's weights, so that a resumed run uses the same ones.

    Hashes the shape and about a thousand evenly spaced values of every parameter: exact,
    cheap, and independent of the device and of the order of floating-point sums.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 1000)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def config_id(model: ProxyCLIP, data: SegmentationDataset, overrides: dict | None = None, digest: str | None = None) -> tuple[str, str]:
    """(id, label) of the configuration: models, weights, method settings and user overrides.

    Settings that come from each dataset's preset (window, stride, short and long side, threshold) are
    not part of it, so one configuration spans all datasets of a table row.
    """
    cfg = model.config
    model_fields = {k: v for k, v in _settings(model).items() if k not in _PER_DATASET}
    if cfg.method != "proxyclip":
        model_fields.pop("vfm")
    ident = {"model": model_fields, "dtype": str(model.dtype), "weights": digest or weights_digest(model),
             "overrides": {k: v for k, v in sorted((overrides or {}).items()) if v is not None},
             "published_ignore": data.published_ignore}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    what = f"+ {cfg.vfm}" if cfg.method == "proxyclip" else f"{cfg.method}"
    extras = [f"{k} {v}" for k, v in ident["overrides"].items()]
    default, named = asdict(type(cfg)()), ("clip", "clip_pretrained", "vfm", "method")  # named already
    extras += [f"{k} {v}" for k, v in model_fields.items() if k not in named and v != default[k]]
    if model.dtype != torch.float32:
        extras.append(str(model.dtype).replace("torch.", ""))
    if data.published_ignore:
        extras.append("published ignore")
    label = f"{cfg.clip} ({cfg.clip_pretrained or 'random'}) {what}" + (f" [{', '.join(extras)}]" if extras else "")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{cfg.clip}_{cfg.vfm if cfg.method == 'proxyclip' else cfg.method}")
    return f"{safe}-{digest}", label


def run_fingerprint(model: ProxyCLIP, data: SegmentationDataset, limit: int | None, digest: str | None = None) -> str:
    """Everything that decides a run's numbers: model, every setting, dataset, selection."""
    ident = {"config": _settings(model),
             "dtype": str(model.dtype), "weights": digest or weights_digest(model), "preset": asdict(data.preset),
             "ignore_index": data.ignore_index, "root": str(data.root.resolve()), "ids": data.ids_digest(),
             "limit": limit}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _State:
    """Images done by this process and their summed areas (replaced whole, never half-updated)."""

    done: tuple[int, ...]
    areas: torch.Tensor  # 3 x C int64


def _load_state(path: Path, fingerprint: str, num_classes: int) -> _State | None:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ProxyCLIPError(f"cannot read the saved progress {path} ({exc}); delete it or run with --restart") from None
    if saved.get("fingerprint") != fingerprint:
        raise ProxyCLIPError(f"saved progress {path} belongs to another run; delete it or run with --restart")
    areas = torch.tensor(saved["areas"], dtype=torch.int64)
    if areas.shape != (3, num_classes):
        raise ProxyCLIPError(f"saved progress {path} is malformed; delete it or run with --restart")
    return _State(tuple(saved["done"]), areas)


def _save_state(path: Path, fingerprint: str, state: _State) -> None:
    record = {"fingerprint": fingerprint, "done": list(state.done), "areas": state.areas.tolist()}
    write_atomically({path: json.dumps(record)})


# ---- evaluation ---------------------------------------------------------------------------------------

def evaluate(
    model: ProxyCLIP,
    data: SegmentationDataset,
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    workers: int = 0,
    resume: bool = True,
    checkpoint_every: int = 20,
    batch_images: int = 1,
    save_predictions: bool = False,
    save_overlays: bool = False,
    progress: bool = False,
    dist: DistInfo | None = None,
    overrides: dict | None = None,
    on_image: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate a model on a dataset; write the results when ``out_dir`` is given.

    Args:
        model: a :class:`~proxyclip.ProxyCLIP` already set to the dataset's settings (window,
            stride, short and long side, threshold: see :func:`preset_config`).
        data: the dataset.
        out_dir: folder for results (``DATASET-CONFIG.json`` / ``.md``), saved progress and
            predictions; None keeps nothing (and cannot resume).
        limit: evaluate only the first ``limit`` images (in the dataset's order).
        workers: loader processes that read and resize images (0: in this process).
        resume: continue from saved progress of the same run; False starts over.
        checkpoint_every: save progress after this many images.
        batch_images: images whose windows share forward passes (throughput on a GPU; the
            numbers do not change).
        save_predictions / save_overlays: write OUT/predictions/DATASET/ID.png (label map) /
            OUT/overlays/DATASET/ID.png (image, colours, legend).
        progress: show a progress bar (images/s, running mIoU of this process).
        dist: this process's rank among ``world`` processes (default: one process).
        overrides: settings the user forced over the preset, recorded in the configuration id.
        on_image: called with the number of images done in this call, after each image.

    Returns:
        The result record (as written to the JSON file): ``metrics`` (aAcc, mIoU, mAcc,
        per-class IoU), ``areas`` (summed int64 counts), ``num_images``, configuration, timing.
    """
    from tqdm import tqdm

    from .images import label_image, overlay_image

    dist = dist or DistInfo()
    preset, classes = data.preset, data.classes
    names = preset.display_names(classes)
    num_classes = len(classes)
    total = len(data) if limit is None else min(limit, len(data))
    if total < 1:
        raise ProxyCLIPError("nothing to evaluate: --limit must be at least 1")
    mine = [i for i in range(total) if i % dist.world == dist.rank]
    digest = weights_digest(model)
    fingerprint = run_fingerprint(model, data, limit, digest)
    cid, clabel = config_id(model, data, overrides, digest)
    out = Path(out_dir) if out_dir is not None else None
    state_path = out / ".state" / f"{preset.key}-{fingerprint}-rank{dist.rank}of{dist.world}.json" if out else None
    state = _State((), torch.zeros(3, num_classes, dtype=torch.int64))
    if state_path is not None:
        if not resume:
            state_path.unlink(missing_ok=True)
        state = _load_state(state_path, fingerprint, num_classes) or state
    done = set(state.done)
    todo = [i for i in mine if i not in done]
    resumed = len(mine) - len(todo)

    keep_image = save_overlays
    loader = torch.utils.data.DataLoader(
        _Items(data, todo, model.config.short_side, model.config.long_side, keep_image),
        batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
    )
    normalise = model.with_config(short_side=None)  # the loader already resized
    text = model.encode_classes(classes)
    bar = tqdm(total=len(mine), initial=resumed, unit="img", desc=preset.key, file=sys.stderr,
               disable=not progress or dist.rank != 0, dynamic_ncols=True)
    pred_dir = out / "predictions" / preset.key if out and save_predictions else None
    overlay_dir = out / "overlays" / preset.key if out and save_overlays else None
    count, since_save, start = 0, 0, time.perf_counter()

    def score(item: dict, logits: torch.Tensor) -> None:
        nonlocal state, count, since_save
        index, label = item["index"], item["label"]
        pred = torch.from_numpy(model.classify_at_size(logits, tuple(label.shape), classes)[0])  # H x W int64
        areas = intersect_and_union(pred, label, num_classes, data.ignore_index)  # 3 x C
        if pred_dir or overlay_dir:
            sample_id = data.samples[index].id
            files: dict[Path, object] = {}
            if pred_dir:
                files[pred_dir / f"{sample_id}.png"] = label_image(pred.numpy(), num_classes)
            if overlay_dir:
                files[overlay_dir / f"{sample_id}.png"] = overlay_image(item["image"], pred.numpy(),
                                                                       names)
            write_atomically(files)
        state = _State((*state.done, index), state.areas + areas)  # one assignment: never half-updated
        count += 1
        since_save += 1
        if state_path is not None and since_save >= checkpoint_every:
            _save_state(state_path, fingerprint, state)
            since_save = 0
        bar.update(1)
        if bar.n % 10 == 0 or bar.n == len(mine):
            miou = summarize(state.areas, names)["mIoU"]
            bar.set_postfix_str(f"mIoU {miou if miou is not None else float('nan'):.2f}")
        if on_image is not None:
            on_image(count)

    pending: list[dict] = []

    def flush() -> None:
        # The windows of all pending images share forward passes; results equal one image at a time.
        images = [normalise.preprocess(it["resized"]) for it in pending]
        for it, logits in zip(pending, model.predict_logits_batch(images, text)):  # Q x h x w each
            score(it, logits)
        pending.clear()

    try:
        for item in loader:
            if item["error"]:
                flush()
                raise DatasetError(item["error"])
            pending.append(item)
            if len(pending) >= batch_images:
                flush()
        flush()
    finally:
        bar.close()
        if state_path is not None and (since_save or not state_path.exists()):
            _save_state(state_path, fingerprint, state)
    seconds = time.perf_counter() - start

    areas = _all_reduce_sum(state.areas, dist)
    images = int(_all_reduce_sum(torch.tensor([len(state.done)]), dist)[0])
    if images != total:
        raise ProxyCLIPError(f"internal error: {images} images were scored but {total} were selected")
    result = {
        "kind": RESULT_KIND,
        "dataset": preset.key,
        "title": preset.title,
        "root": str(data.root),
        "num_images": total,
        "complete": total == len(data),
        "ignore_index": data.ignore_index,
        "published_ignore": data.published_ignore,
        "config_id": cid,
        "config_label": clabel,
        "config": _settings(model),
        "dtype": str(model.dtype).replace("torch.", ""),
        "overrides": {k: v for k, v in (overrides or {}).items() if v is not None},
        "world_size": dist.world,
        "metrics": summarize(areas, names),
        "areas": dict(zip(AREA_ROWS, areas.tolist())),
        "seconds": round(seconds, 3),
        "images_per_second": round(count * dist.world / seconds, 3) if count and seconds > 0 else None,
    }
    if out is not None and dist.rank == 0:
        write_atomically({out / f"{preset.key}-{cid}.json": json.dumps(result, indent=1) + "\n",
                          out / f"{preset.key}-{cid}.md": result_markdown(result)})
    return result


def preset_config(model: ProxyCLIP, preset: DatasetPreset, overrides: dict | None = None) -> ProxyCLIP:
    """The model with a preset's settings (window, stride, short and long side, threshold); ``overrides``
    (None values ignored) take precedence."""
    settings = {k: getattr(preset, k) for k in _PER_DATASET}
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if settings.get("short_side") == 0:
        settings["short_side"] = None
    return model.with_config(**settings)


# ---- reports ------------------------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def result_markdown(result: dict) -> str:
    """A per-dataset report: summary line and per-class IoU / accuracy table."""
    m = result["metrics"]
    lines = [f"# {result['title']}: {result['config_label']}", "",
             f"{result['num_images']} images{'' if result['complete'] else ' (partial: --limit)'}, "
             f"ignore index {result['ignore_index']}", "",
             "| mIoU | aAcc | mAcc |", "|---:|---:|---:|",
             f"| {_fmt(m['mIoU'])} | {_fmt(m['aAcc'])} | {_fmt(m['mAcc'])} |", "",
             "| class | IoU | Acc |", "|---|---:|---:|"]
    lines += [f"| {c['class']} | {_fmt(c['IoU'])} | {_fmt(c['Acc'])} |" for c in m["per_class"]]
    return "\n".join(lines) + "\n"


def collect_results(out_dir: str | Path) -> list[dict]:
    """Every result record in a folder (from any configuration)."""
    results = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("kind") == RESULT_KIND:
            results.append(record)
    return results


def table1(results: Sequence[dict]) -> tuple[str, list[dict]]:
    """The paper's Table 1 layout: one row per configuration.

    Columns: VOC21, Context60, Object, VOC20, Context59, Stuff, City, ADE, Avg (mean of those
    eight mIoUs, shown only when all eight are there), ADE847, Context459. A value marked *
    comes from a partial run (--limit).

    Returns:
        The Markdown table and the rows as dicts (label, config_id, {dataset: mIoU}, avg).
    """
    rows: dict[str, dict] = {}
    for r in results:
        if r["dataset"] not in (*TABLE1_MAIN, *TABLE1_LARGE):
            continue  # user datasets have their own result files
        row = rows.setdefault(r["config_id"], {"config_id": r["config_id"], "label": r["config_label"],
                                               "mIoU": {}, "complete": {}})
        row["mIoU"][r["dataset"]] = r["metrics"]["mIoU"]
        row["complete"][r["dataset"]] = r["complete"]
    keys = (*TABLE1_MAIN, "avg", *TABLE1_LARGE)
    titles = [PRESETS[k].title if k in PRESETS else "Avg" for k in keys]
    lines = ["| Configuration | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows.values():
        main = [row["mIoU"].get(k) for k in TABLE1_MAIN]
        row["avg"] = float(np.round(np.mean(main), 2)) if all(v is not None for v in main) else None
        cells = []
        for k in keys:
            if k == "avg":
                cells.append(_fmt(row["avg"]) + ("*" if row["avg"] is not None and not all(
                    row["complete"][d] for d in TABLE1_MAIN) else ""))
            else:
                cells.append(_fmt(row["mIoU"].get(k)) + ("*" if k in row["complete"] and not row["complete"][k] else ""))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", list(rows.values())


# ---- command line -------------------------------------------------------------------------------------

def add_eval_parsers(sub) -> None:
    """Register ``eval``, ``presets`` and ``prepare`` on the ``proxyclip`` command."""
    from .cli import add_inference_args, add_model_args

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
    add_inference_args(p, window=None, stride=None, short_side=None, bg_threshold=None, long_side=None)
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
        from .classes import read_class_file

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
    from .cli import EXIT_OK, build_model, config_from_args, ensure_writable_dir, resolve_device

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
    overrides = {k: getattr(args, k) for k in _PER_DATASET}
    model = None
    try:
        for data in datasets:
            if model is None:
                model = build_model(args, config_from_args(args, **{k: getattr(data.preset, k) for k in _PER_DATASET}))
            model = preset_config(model, data.preset, overrides)
            result = evaluate(model, data, out_dir=args.out, limit=args.limit, workers=args.workers,
                              resume=not args.restart, checkpoint_every=args.checkpoint_every,
                              batch_images=args.batch_images,
                              save_predictions=args.save_predictions, save_overlays=args.save_overlays,
                              progress=not args.no_progress, dist=dist, overrides=overrides)
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


def run_presets(args: argparse.Namespace) -> int:
    from .cli import EXIT_OK

    if args.key is None:
        head = ("key", "classes", "threshold", "short side", "window/stride", "labels", "ignore", "images / labels")
        rows = []
        for p in PRESETS.values():
            mapping = "reduce zero" if p.reduce_zero_label else p.label_dtype
            ignore = f"{p.ignore_index}" + (f" (published {p.published_ignore_index})" if p.published_ignore_index else "")
            rows.append((p.key, str(p.num_classes), f"{p.bg_threshold:g}", str(p.short_side), f"{p.window}/{p.stride}",
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

    from .cli import EXIT_OK
    from .datasets import coco_object_jobs, convert_coco_object_label

    jobs = coco_object_jobs(args.root)
    todo = [job for job in jobs if args.overwrite or not job[1].exists()]
    for source, target, kind in tqdm(todo, unit="label", desc="coco-object", file=sys.stderr):
        convert_coco_object_label(source, target, kind)
    print(f"coco-object: wrote {len(todo)} label maps ({len(jobs) - len(todo)} existed already) under "
          f"{args.root / 'annotations'}", file=sys.stderr)
    return EXIT_OK


__all__ = [
    "DistInfo", "add_eval_parsers", "collect_results", "config_id", "evaluate", "init_distributed",
    "preset_config", "result_markdown", "table1",
]
