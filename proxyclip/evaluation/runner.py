"""Benchmark evaluation: a model on a dataset, as the published runs scored it.

Per image, exactly what :meth:`ProxyCLIP.segment` does: load RGB, resize by the protocol's rule,
sliding-window logits resized to the original size, classify; then count the per-class areas
against the ground truth at the original size (:mod:`proxyclip.evaluation.metrics`).

The parts, each usable alone:

- :func:`dataset_settings`: the inference settings for one dataset (user > method's own for the
  dataset > preset > method > defaults);
- :func:`make_loader`: images read and resized in DataLoader workers while the model runs;
- :class:`ResumeState`: the finished image indices and their summed areas, saved atomically under
  ``OUT/.state`` and keyed by a fingerprint of everything that decides the numbers, so a
  restarted run skips what is done and ends with the same integers;
- :class:`Scorer`: classifies a batch of images and adds their areas (and writes predictions);
- :func:`make_result`: the record written as ``OUT/DATASET-CONFIG.json`` / ``.md``;
- :func:`evaluate`: the loop that joins them, sharded over processes (:mod:`.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ProxyCLIPError
from ..images import label_image, overlay_image, write_atomically
from ..loading import default_workers, read_resized  # noqa: F401  (default_workers: re-exported)
from ..loading import make_loader as _loader
from ..model.config import method_defaults
from ..model.methods import get_method
from ..progress import CountBar
from .datasets import DatasetError, SegmentationDataset
from .distributed import DistInfo, all_reduce_sum, shard
from .metrics import AREA_ROWS, intersect_and_union, summarize
from .presets import DATASET_SETTINGS, PROTOCOLS, DatasetPreset  # noqa: F401  (PROTOCOLS: light there, for the CLI)
from .report import RESULT_KIND, result_markdown

if TYPE_CHECKING:
    from ..model.segmenter import ProxyCLIP



# ---- settings -----------------------------------------------------------------------------------

def dataset_settings(method: str, preset: DatasetPreset, overrides: Mapping[str, Any] | None = None,
                     protocol: str = "method") -> dict[str, Any]:
    """Every general inference setting for ``method`` on ``preset``'s dataset.

    Layers, later ones win: the config's defaults, the method's own settings, the preset's
    protocol, the method's published settings for this dataset (unless ``protocol="dataset"``),
    then the user's ``overrides`` (None values ignored; a short side of 0 means no resizing).
    """
    if protocol not in PROTOCOLS:
        raise ProxyCLIPError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    spec = get_method(method)
    skip = {*spec.option_names(), "window_batch"}  # options are the method's; window_batch decides memory only
    settings = {k: v for k, v in method_defaults(method).items() if k not in skip}
    settings.update(preset.settings)
    if protocol == "method":
        settings.update(spec.dataset_settings.get(preset.key, {}))
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if settings.get("short_side") == 0:
        settings["short_side"] = None
    return settings


def preset_config(model: ProxyCLIP, preset: DatasetPreset, overrides: Mapping[str, Any] | None = None,
                  protocol: str = "method") -> ProxyCLIP:
    """The model with the settings of :func:`dataset_settings` for ``preset``."""
    return model.with_config(**dataset_settings(model.config.method, preset, overrides, protocol))


def _decisive_settings(model: ProxyCLIP) -> dict:
    """Every setting that decides the numbers (flat, method options by name)."""
    return model.config.settings()


# ---- run identity ---------------------------------------------------------------------------------

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


def config_id(model: ProxyCLIP, data: SegmentationDataset, overrides: Mapping[str, Any] | None = None,
              digest: str | None = None, protocol: str = "method") -> tuple[str, str]:
    """(id, label) of the configuration: models, weights, method settings and user overrides.

    Settings that come from each dataset's protocol (window, stride, short and long side, threshold)
    are not part of it, so one configuration spans all datasets of a table row.
    """
    cfg = model.config
    model_fields = {k: v for k, v in _decisive_settings(model).items() if k not in DATASET_SETTINGS}
    if not cfg.needs_vfm:
        model_fields.pop("vfm")
    ident = {"model": model_fields, "dtype": str(model.dtype), "weights": digest or weights_digest(model),
             "overrides": {k: v for k, v in sorted((overrides or {}).items()) if v is not None},
             "published_ignore": data.published_ignore}
    if protocol != "method":
        ident["protocol"] = protocol
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    spec = get_method(cfg.method)
    what = f"{spec.title} + {cfg.vfm}" if cfg.needs_vfm else spec.title
    extras = [f"{k} {v}" for k, v in ident["overrides"].items()]
    default = method_defaults(cfg.method)
    named = ("clip", "clip_pretrained", "vfm", "method")  # in the label already
    extras += [f"{k} {v}" for k, v in model_fields.items() if k not in named and v != default.get(k)]
    if model.dtype != torch.float32:
        extras.append(str(model.dtype).replace("torch.", ""))
    if data.published_ignore:
        extras.append("published ignore")
    if protocol != "method":
        extras.append(f"{protocol} protocol")
    label = f"{cfg.clip} ({cfg.clip_pretrained or 'random'}) {what}" + (f" [{', '.join(extras)}]" if extras else "")
    name = cfg.vfm if cfg.needs_vfm and cfg.method == "proxyclip" else (
        f"{cfg.method}_{cfg.vfm}" if cfg.needs_vfm else cfg.method)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{cfg.clip}_{name}")
    return f"{safe}-{digest}", label


def run_fingerprint(model: ProxyCLIP, data: SegmentationDataset, limit: int | None, digest: str | None = None) -> str:
    """Everything that decides a run's numbers: model, every setting, dataset, selection."""
    preset = {k: v for k, v in vars(data.preset).items()}
    ident = {"config": _decisive_settings(model), "dtype": str(model.dtype),
             "weights": digest or weights_digest(model), "preset": preset,
             "ignore_index": data.ignore_index, "root": str(data.root.resolve()), "ids": data.ids_digest(),
             "limit": limit}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- resume state ---------------------------------------------------------------------------------

class ResumeState:
    """The images this process has scored and their summed areas, saved atomically.

    Args:
        path: the state file (None: nothing is saved or resumed).
        fingerprint: :func:`run_fingerprint` of the run; a file of another run is refused.
        num_classes: C.
        resume: read a saved state of the same run; False deletes it and starts over.
        every: save after this many new images (and on :meth:`save`).
    """

    def __init__(self, path: Path | None, fingerprint: str, num_classes: int, resume: bool = True, every: int = 20):
        self.path, self.fingerprint, self.every = path, fingerprint, every
        self.done: tuple[int, ...] = ()
        self.areas = torch.zeros(3, num_classes, dtype=torch.int64)  # 3 x C
        self._unsaved = 0
        if path is not None:
            if not resume:
                path.unlink(missing_ok=True)
            self._load(num_classes)

    def _load(self, num_classes: int) -> None:
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ProxyCLIPError(f"cannot read the saved progress {self.path} ({exc}); delete it or run with --restart") from None
        if saved.get("fingerprint") != self.fingerprint:
            raise ProxyCLIPError(f"saved progress {self.path} belongs to another run; delete it or run with --restart")
        areas = torch.tensor(saved["areas"], dtype=torch.int64)
        if areas.shape != self.areas.shape:
            raise ProxyCLIPError(f"saved progress {self.path} is malformed; delete it or run with --restart")
        self.done, self.areas = tuple(saved["done"]), areas

    def add(self, index: int, areas: torch.Tensor) -> None:
        """Record image ``index`` with its 3 x C areas; saves every ``every`` images."""
        self.done, self.areas = (*self.done, index), self.areas + areas  # both replaced, never half-updated
        self._unsaved += 1
        if self._unsaved >= self.every:
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        record = {"fingerprint": self.fingerprint, "done": list(self.done), "areas": self.areas.tolist()}
        write_atomically({self.path: json.dumps(record)})
        self._unsaved = 0

    def flush(self) -> None:
        """Save if anything is unsaved (or nothing was ever saved)."""
        if self.path is not None and (self._unsaved or not self.path.exists()):
            self.save()


# ---- loading in workers -----------------------------------------------------------------------------

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


def make_loader(data: SegmentationDataset, indices: Sequence[int], model: ProxyCLIP, workers: int = 0,
                keep_image: bool = False) -> torch.utils.data.DataLoader:
    """Items ``{"index", "error", "resized", "label", "image"}`` of ``indices``, in order, read and
    resized (by the model's rule) in ``workers`` background processes."""
    return _loader(_Items(data, indices, model.config.short_side, model.config.long_side, keep_image), workers)


def _batches(loader: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Loaded items in lists of ``size``; an item that failed to load ends the run with its error,
    after the items before it."""
    pending: list[dict] = []
    for item in loader:
        if item["error"]:
            if pending:
                yield pending
            raise DatasetError(item["error"])
        pending.append(item)
        if len(pending) >= size:
            yield pending
            pending = []
    if pending:
        yield pending


# ---- scoring ----------------------------------------------------------------------------------------

class Scorer:
    """Classifies loaded images and adds their areas to a :class:`ResumeState`.

    Args:
        model: the segmenter, set to the dataset's settings.
        data: the dataset (classes, ignore index, sample ids).
        state: where the areas go.
        pred_dir / overlay_dir: write label maps / overlays there (None: not).
        text_progress: ``progress(done, total)`` of encoding the class names (if not cached).
    """

    def __init__(self, model: ProxyCLIP, data: SegmentationDataset, state: ResumeState,
                 pred_dir: Path | None = None, overlay_dir: Path | None = None,
                 text_progress: Callable[[int, int], None] | None = None):
        self.model, self.data, self.state = model, data, state
        self.pred_dir, self.overlay_dir = pred_dir, overlay_dir
        self.classes = data.classes
        self.names = data.preset.display_names(self.classes)
        self.text = model.encode_classes(self.classes, text_progress)
        self.normalise = model.with_config(short_side=None)  # the loader resized already

    def score(self, items: Sequence[dict]) -> None:
        """Score a batch of loaded items; their windows share forward passes (same numbers as one
        image at a time)."""
        if not items:
            return
        images = [self.normalise.preprocess(it["resized"]) for it in items]
        # a refinement (PAMR) runs at the original size, as published; otherwise classify_at_size resizes
        sizes = [tuple(it["label"].shape) for it in items] if self.model.config.refine else None
        for item, logits in zip(items, self.model.predict_logits_batch(images, self.text, sizes)):  # Q x h x w each
            self._score_one(item, logits)

    def _score_one(self, item: dict, logits: torch.Tensor) -> None:
        index, label = item["index"], item["label"]
        num_classes = len(self.classes)
        pred = torch.from_numpy(self.model.classify_at_size(logits, tuple(label.shape), self.classes)[0])  # H x W
        areas = intersect_and_union(pred, label, num_classes, self.data.ignore_index)  # 3 x C
        if self.pred_dir or self.overlay_dir:
            sample_id = self.data.samples[index].id
            files: dict[Path, object] = {}
            if self.pred_dir:
                files[self.pred_dir / f"{sample_id}.png"] = label_image(pred.numpy(), num_classes)
            if self.overlay_dir:
                files[self.overlay_dir / f"{sample_id}.png"] = overlay_image(item["image"], pred.numpy(), self.names)
            write_atomically(files)
        self.state.add(index, areas)

    def running_miou(self) -> float | None:
        return summarize(self.state.areas, self.names)["mIoU"]


# ---- the result ---------------------------------------------------------------------------------------

def make_result(model: ProxyCLIP, data: SegmentationDataset, areas: torch.Tensor, num_images: int, *,
                cid: str, label: str, overrides: Mapping[str, Any], protocol: str, world: int, seconds: float,
                images_scored: int, provenance: Mapping[str, Any] | None = None) -> dict:
    """The result record of a finished run (as written to ``OUT/DATASET-CONFIG.json``)."""
    names = data.preset.display_names(data.classes)
    preset = data.preset
    return {
        "kind": RESULT_KIND,
        "dataset": preset.key,
        "title": preset.title,
        "root": str(data.root),
        "num_images": num_images,
        "complete": num_images == len(data),
        "ignore_index": data.ignore_index,
        "published_ignore": data.published_ignore,
        "config_id": cid,
        "config_label": label,
        "config": _decisive_settings(model),
        "method": model.config.method,
        "protocol": protocol,  # whose per-dataset settings were used: the method's published ones or the preset's
        "dataset_settings": {k: getattr(model.config, k) for k in DATASET_SETTINGS},
        "dtype": str(model.dtype).replace("torch.", ""),
        "overrides": {k: v for k, v in overrides.items() if v is not None},
        "world_size": world,
        "metrics": summarize(areas, names),
        "areas": dict(zip(AREA_ROWS, areas.tolist())),
        "seconds": round(seconds, 3),
        "images_per_second": round(images_scored * world / seconds, 3) if images_scored and seconds > 0 else None,
        # what produced the numbers: weights (files and digests, or random with a seed), device, versions
        "provenance": dict(provenance) if provenance else {"device": str(model.device), "torch": torch.__version__},
    }


# ---- evaluation ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunOptions:
    """How a run proceeds (none of these changes the numbers)."""

    out_dir: Path | None = None  # results, saved progress, predictions; None keeps nothing (cannot resume)
    limit: int | None = None  # only the first N images, in the dataset's order
    workers: int = 0  # loader processes (0: in this process)
    resume: bool = True  # continue from saved progress of the same run
    checkpoint_every: int = 20  # save progress after this many images
    batch_images: int = 1  # images whose windows share forward passes
    save_predictions: bool = False  # OUT/predictions/DATASET/ID.png
    save_overlays: bool = False  # OUT/overlays/DATASET/ID.png
    progress: bool = False  # a progress bar with the running mIoU


def evaluate(
    model: ProxyCLIP,
    data: SegmentationDataset,
    run: RunOptions | None = None,
    *,
    dist: DistInfo | None = None,
    overrides: Mapping[str, Any] | None = None,
    protocol: str = "method",
    on_image: Callable[[int], None] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict:
    """Evaluate a model on a dataset; write the results when ``run.out_dir`` is given.

    Args:
        model: a :class:`~proxyclip.ProxyCLIP` already set to the dataset's settings
            (see :func:`preset_config`).
        data: the dataset.
        run: :class:`RunOptions`.
        dist: this process's rank among ``world`` processes (default: one process).
        overrides: settings the user forced over the protocol, recorded in the configuration id.
        protocol: recorded in the result: "method" (the method's own per-dataset settings) or "dataset".
        on_image: called with the number of images done in this call, after each image.
        provenance: recorded in the result as is (see ``proxyclip.apps.eval.run_provenance``).

    Returns:
        The result record (as written to the JSON file): ``metrics`` (aAcc, mIoU, mAcc,
        per-class IoU), ``areas`` (summed int64 counts), ``num_images``, configuration, timing.
    """
    from tqdm import tqdm

    run = run or RunOptions()
    dist = dist or DistInfo()
    overrides = dict(overrides or {})
    preset = data.preset
    total = len(data) if run.limit is None else min(run.limit, len(data))
    if total < 1:
        raise ProxyCLIPError("nothing to evaluate: --limit must be at least 1")
    digest = weights_digest(model)
    fingerprint = run_fingerprint(model, data, run.limit, digest)
    cid, clabel = config_id(model, data, overrides, digest, protocol)
    out = Path(run.out_dir) if run.out_dir is not None else None
    state_path = out / ".state" / f"{preset.key}-{fingerprint}-rank{dist.rank}of{dist.world}.json" if out else None
    state = ResumeState(state_path, fingerprint, len(data.classes), run.resume, run.checkpoint_every)
    mine = shard(total, dist)
    done = set(state.done)
    todo = [i for i in mine if i not in done]
    scorer = Scorer(model, data, state,
                    pred_dir=out / "predictions" / preset.key if out and run.save_predictions else None,
                    overlay_dir=out / "overlays" / preset.key if out and run.save_overlays else None,
                    text_progress=CountBar("encoding class names", "name", disable=not run.progress or dist.rank != 0))
    loader = make_loader(data, todo, model, run.workers, keep_image=run.save_overlays)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc=preset.key, file=sys.stderr,
               disable=not run.progress or dist.rank != 0, dynamic_ncols=True)
    start, resumed = time.perf_counter(), len(state.done)
    try:
        for batch in _batches(loader, run.batch_images):
            scorer.score(batch)
            bar.update(len(batch))
            if bar.n % 10 < len(batch) or bar.n == len(mine):
                miou = scorer.running_miou()
                bar.set_postfix_str(f"mIoU {miou if miou is not None else float('nan'):.2f}")
            if on_image is not None:
                on_image(len(state.done) - resumed)
    finally:
        bar.close()
        failing = sys.exc_info()[0] is not None
        try:
            state.flush()
        except ProxyCLIPError:
            if not failing:  # else the first error (often the same full disk) is the one to show
                raise
    seconds = time.perf_counter() - start

    areas = all_reduce_sum(state.areas, dist)
    images = int(all_reduce_sum(torch.tensor([len(state.done)]), dist)[0])
    if images != total:
        raise ProxyCLIPError(f"internal error: {images} images were scored but {total} were selected")
    result = make_result(model, data, areas, total, cid=cid, label=clabel, overrides=overrides, protocol=protocol,
                         world=dist.world, seconds=seconds, images_scored=len(state.done) - resumed,
                         provenance=provenance)
    if out is not None and dist.rank == 0:
        write_atomically({out / f"{preset.key}-{cid}.json": json.dumps(result, indent=1) + "\n",
                          out / f"{preset.key}-{cid}.md": result_markdown(result)})
    return result
