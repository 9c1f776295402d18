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

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ProxyCLIPError
from ..images import write_atomically
from ..loading import default_workers, make_loader, read_resized  # noqa: F401  (default_workers: moved there)
from ..progress import CountBar
from .datasets import DatasetError, SegmentationDataset
from .metrics import AREA_ROWS, intersect_and_union, summarize
from .presets import PRESETS, TABLE1_LARGE, TABLE1_MAIN, DatasetPreset

if TYPE_CHECKING:
    from ..model.segmenter import ProxyCLIP

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
        index = self.indices[k]
        sample = self.data.samples[index]
        try:
            # the resize of ProxyCLIP.preprocess, done here in the worker
            image, resized = read_resized(sample.image, self.short_side, self.long_side)  # H x W x 3, h x w x 3 uint8
            label = self.data.read_label(sample.label)  # H x W int64
        except ProxyCLIPError as exc:
            return {"index": index, "error": str(exc)}
        if label.shape != image.shape[:2]:
            return {"index": index, "error": f"{sample.label}: label size {label.shape[1]}x{label.shape[0]} differs "
                                             f"from image {sample.image} ({image.shape[1]}x{image.shape[0]})"}
        return {"index": index, "error": None, "resized": resized,  # h x w x 3 uint8
                "label": torch.from_numpy(label), "image": image if self.keep_image else None}


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
    provenance: dict | None = None,
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
        provenance: what produced the numbers (weight files and digests or random weights and seed,
            device, precision, versions), recorded as is in the result.

    Returns:
        The result record (as written to the JSON file): ``metrics`` (aAcc, mIoU, mAcc,
        per-class IoU), ``areas`` (summed int64 counts), ``num_images``, configuration, timing.
    """
    from tqdm import tqdm

    from ..images import label_image, overlay_image

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
    loader = make_loader(_Items(data, todo, model.config.short_side, model.config.long_side, keep_image), workers)
    normalise = model.with_config(short_side=None)  # the loader already resized
    text = model.encode_classes(classes, CountBar("encoding class names", "name", disable=not progress or dist.rank != 0))
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
        failing = sys.exc_info()[0] is not None
        if state_path is not None and (since_save or not state_path.exists()):
            try:
                _save_state(state_path, fingerprint, state)
            except ProxyCLIPError:
                if not failing:  # else the first error (often the same full disk) is the one to show
                    raise
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
        "provenance": provenance or {"device": str(model.device), "torch": torch.__version__},
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


