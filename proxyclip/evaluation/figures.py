"""The paper's figures: the numbers behind each as pure functions, and the plots (matplotlib).

- Fig. 1, semantic coherence: every pair of patches of an image is a binary example (same
  majority label or not), scored by CLIP's last-layer attention (q-k, q-q, k-k, v-v) and by VFM
  feature similarities; precision-recall curves and average precision. Pairs are hundreds of
  thousands per image, so they are never kept: :class:`PairHistogram` streams them into
  histograms of scores for positives and negatives (bins by the float32 bit pattern) and gives the
  AP of the binned scores with a bound on its distance to the AP of the exact scores.
- Fig. 4, patch similarities before and after eq. 6: :class:`ValueHistogram` and its median.
- Fig. 8, mIoU against beta and gamma: plotted from the sweep tables of
  :mod:`proxyclip.evaluation.grid`.
- Figs. 5-7, qualitative grids: :func:`compare_panels`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProxyCLIPError

# ---- streaming average precision -------------------------------------------------------------------


def ordered_bins(scores: np.ndarray, bits: int) -> np.ndarray:
    """Bin index of float32 scores, increasing with the score: the top ``bits`` bits of the
    float's bit pattern mapped to an order-preserving unsigned integer.

    With ``bits`` = 9 + m, scores with at most m mantissa bits (e.g. multiples of 2^-m in [0.5, 1))
    each get a bin of their own; bins are about 2^-m of a score wide relative to its size.

    Args:
        scores: any shape, cast to float32 (NaN not allowed).

    Returns:
        int64 array of the same shape, values in [0, 2^bits).
    """
    raw = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    negative = (raw >> 31).astype(bool)
    key = np.where(negative, ~raw, raw | np.uint32(0x80000000))  # order-preserving for all finite floats
    return (key >> np.uint32(32 - bits)).astype(np.int64)


def bin_floor(bins: np.ndarray, bits: int) -> np.ndarray:
    """The smallest float32 score of each bin (inverse of :func:`ordered_bins` at the bin's start)."""
    key = (np.asarray(bins, dtype=np.uint64) << np.uint64(32 - bits)).astype(np.uint32)
    negative = (key >> 31) == 0
    raw = np.where(negative, ~key, key & np.uint32(0x7FFFFFFF))
    return raw.astype(np.uint32).view(np.float32)


class PairHistogram:
    """Counts of positive and negative examples per score bin, filled a batch at a time.

    Args:
        bits: bins are the top ``bits`` bits of the float32 score (2^bits bins, two int64 arrays;
            20 bits = 16 MiB, a relative resolution of 2^-11).
    """

    def __init__(self, bits: int = 20):
        if not 9 <= bits <= 24:
            raise ValueError("bits must lie in [9, 24]")
        self.bits = bits
        self.positive = np.zeros(1 << bits, dtype=np.int64)
        self.negative = np.zeros(1 << bits, dtype=np.int64)

    def add(self, scores: np.ndarray, positive: np.ndarray) -> None:
        """Add examples: ``scores`` (float, any shape) and ``positive`` (bool, same shape)."""
        bins = ordered_bins(np.asarray(scores).ravel(), self.bits)
        positive = np.asarray(positive, dtype=bool).ravel()
        size = 1 << self.bits
        self.positive += np.bincount(bins[positive], minlength=size)
        self.negative += np.bincount(bins[~positive], minlength=size)

    def merge(self, other: PairHistogram) -> None:
        self.positive += other.positive
        self.negative += other.negative

    def _descending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        used = np.flatnonzero(self.positive + self.negative)[::-1]  # bins with examples, highest score first
        return used, self.positive[used], self.negative[used]

    def counts(self) -> tuple[int, int]:
        """(positives, negatives)."""
        return int(self.positive.sum()), int(self.negative.sum())

    def average_precision(self) -> tuple[float, float]:
        """(AP, bound): the average precision of the binned scores and a bound on its distance to
        the AP of the exact scores.

        AP = sum over thresholds of (R_k - R_{k-1}) P_k, scikit-learn's ``average_precision_score``,
        with the examples of one bin tied. For exact scores, the k-th positive of bin b (a positives
        and c examples in higher bins; p positives and n examples in b) ends a tie group at some
        position t of the bin with s >= k positives up to it, k <= s <= t <= n - (p - s), so its
        precision (a + s) / (c + t) lies in [(a + 1) / (c + n - p + 1), (a + p) / (c + p)], and so
        does the binned (a + p) / (c + n). Hence
        |AP_exact - AP_binned| <= (1 / P) sum_b p_b (upper_b - lower_b),
        which is 0 when every bin holds only positives or a single positive and no negative.
        """
        _, pos, neg = self._descending()
        total_pos = int(pos.sum())
        if total_pos == 0:
            return float("nan"), 0.0
        tp = np.cumsum(pos)  # positives at or above each bin
        seen = np.cumsum(pos + neg)
        precision = tp / seen
        recall = tp / total_pos
        ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
        a, c = tp - pos, seen - (pos + neg)  # above the bin
        n = pos + neg
        has = pos > 0
        upper = (a[has] + pos[has]) / (c[has] + pos[has])
        lower = (a[has] + 1) / (c[has] + n[has] - pos[has] + 1)
        bound = float(np.sum(pos[has] * (upper - lower)) / total_pos)
        return ap, bound

    def pr_curve(self, points: int = 400) -> dict[str, list[float]]:
        """Precision and recall at the bins' lower edges (thresholds), at most ``points`` of them
        (evenly spaced in recall), starting at the highest threshold."""
        used, pos, neg = self._descending()
        total_pos = int(pos.sum())
        if total_pos == 0:
            return {"recall": [], "precision": [], "threshold": []}
        tp = np.cumsum(pos)
        precision = tp / np.cumsum(pos + neg)
        recall = tp / total_pos
        keep = np.unique(np.searchsorted(recall, np.linspace(0, 1, points), side="left").clip(0, len(recall) - 1))
        return {"recall": recall[keep].tolist(), "precision": precision[keep].tolist(),
                "threshold": bin_floor(used[keep], self.bits).astype(float).tolist()}


# ---- Fig. 1: semantic coherence ------------------------------------------------------------------------

CLIP_SCORES = ("q-k", "q-q", "k-k", "v-v")


def patch_labels(labels: np.ndarray, grid: tuple[int, int], ignore_index: int, num_classes: int) -> np.ndarray:
    """Each patch's label by majority vote over its pixels (ignored pixels excluded).

    Args:
        labels: H x W int label map; a pixel belongs to patch (y * h // H, x * w // W).
        grid: (h, w) patches.

    Returns:
        h x w int64, -1 where a patch has no labelled pixel. Ties go to the smallest label.
    """
    height, width = labels.shape
    h, w = grid
    rows = (np.arange(height) * h // height)[:, None]
    cols = (np.arange(width) * w // width)[None, :]
    patch = (rows * w + cols).ravel()  # HW
    flat = labels.ravel().astype(np.int64)
    keep = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    votes = np.bincount(patch[keep] * num_classes + flat[keep], minlength=h * w * num_classes).reshape(h * w, num_classes)
    out = votes.argmax(axis=1)
    out[votes.sum(axis=1) == 0] = -1
    return out.reshape(h, w)


def pair_examples(patch_label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of Fig. 1: every ordered pair (i, j), i != j, of labelled patches.

    Args:
        patch_label: L (flattened h x w), -1 for unlabelled.

    Returns:
        valid (L x L bool) and positive (L x L bool: same label) masks.
    """
    lab = np.asarray(patch_label).ravel()
    labelled = lab >= 0
    valid = labelled[:, None] & labelled[None, :]
    np.fill_diagonal(valid, False)
    return valid, lab[:, None] == lab[None, :]


def clip_attention_scores(clip, pixels, which: Sequence[str] = CLIP_SCORES) -> dict[str, Any]:
    """CLIP's last-layer attention between patches: softmax(a b^T / sqrt(d)) per head, averaged
    over heads, for (a, b) = (q, k), (q, q), (k, k), (v, v); the class token dropped first.

    Args:
        clip: a :class:`proxyclip.model.clip.ClipAdapter`.
        pixels: N x 3 x H x W, CLIP-normalised, in the model's dtype.

    Returns:
        name -> N x L x L float32 (L = CLIP's patches).
    """
    import torch

    with torch.inference_mode():
        x = clip.last_block_input(pixels)  # N x (1 + L) x D
        block = clip.block(-1)
        q, k, v = (t[:, 1:] for t in block.qkv(block.ln_1(x)))  # N x L x D each
        n, length, dim = q.shape
        heads = block.heads
        parts = {"q": q, "k": k, "v": v}
        out = {}
        for name in which:
            a, b = (parts[s].float().reshape(n, length, heads, dim // heads).transpose(1, 2) for s in name.split("-"))
            logits = a @ b.transpose(-1, -2) / math.sqrt(dim // heads)  # N x H x L x L
            out[name] = logits.softmax(dim=-1).mean(dim=1)  # N x L x L
        return out


def cosine_similarity(feats) -> Any:
    """N x C x h x w features -> N x L x L cosine similarities (float32)."""
    import torch.nn.functional as F

    x = F.normalize(feats.float().flatten(2), dim=1)  # N x C x L
    return x.transpose(1, 2) @ x  # N x L x L


def make_fig1(spec: Mapping[str, Any], dataset, ctx, out: Path, *, device, dtype, random_weights: bool = False) -> list[Path]:
    """Fig. 1 on ``dataset``: histograms over every image (or ``--limit``), then curves and APs."""
    import torch
    import torch.nn.functional as F

    from ..images import load_image
    from ..model.config import ProxyCLIPConfig
    from ..model.methods import Windows
    from ..model.pixels import clip_input_constants, normalise_clip_input
    from ..model.segmenter import ProxyCLIP
    from ..model.vfm import VFM_BUILDERS

    size = int(spec.get("size", 336))
    clip_name = ctx.clip or spec.get("clip", "ViT-B-16")
    config = ProxyCLIPConfig.create(clip=clip_name, clip_pretrained=ctx.clip_pretrained, method="clip", window=size,
                                    stride=size)
    base = ProxyCLIP.build(config, clip_weights=ctx.weights.clip_file(clip_name), random_weights=random_weights,
                           device=device, dtype=dtype)
    vfms = {}
    for key in spec.get("vfms", []):
        if key not in VFM_BUILDERS:
            raise ProxyCLIPError(f"VFM {key!r} is not available; choose from {', '.join(VFM_BUILDERS)}")
        vfm = VFM_BUILDERS[key](weights=ctx.weights.vfm_file(key), random_weights=random_weights).to(dtype)
        vfms[key] = ProxyCLIP(base.clip_model, base.tokenizer, vfm, config.updated(method="proxyclip", vfm=key)).to(device)
    scores = list(spec.get("clip_scores", CLIP_SCORES))
    hists = {f"CLIP {s}": PairHistogram() for s in scores}
    hists.update({key: PairHistogram() for key in vfms})
    total = len(dataset) if ctx.limit is None else min(ctx.limit, len(dataset))
    num_classes = len(dataset.classes)
    for index in range(total):
        sample = dataset.samples[index]
        image = torch.tensor(load_image(sample.image)).permute(2, 0, 1)[None].float() / 255.0  # 1 x 3 x H x W
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        label = dataset.read_label(sample.label)
        label = torch.from_numpy(label)[None, None].float()
        label = F.interpolate(label, size=(size, size), mode="nearest")[0, 0].long().numpy()  # size x size
        pixels = normalise_clip_input(image.to(device) * 255, *clip_input_constants(*base.clip.normalisation))  # 1 x 3 x s x s
        grid = base.clip.grid(pixels)
        valid, positive = pair_examples(patch_labels(label, grid, dataset.ignore_index, num_classes))
        for name, value in clip_attention_scores(base.clip, pixels.to(base.clip.dtype), scores).items():
            hists[f"CLIP {name}"].add(value[0].cpu().numpy()[valid], positive[valid])
        for key, model in vfms.items():
            with torch.inference_mode():
                windows = Windows(source=pixels, clip=model.clip, vfm=model.vfm, window=size, to_vfm_input=model.to_vfm_input)
                feats = windows.vfm_features()  # 1 x C x h x w
            v_valid, v_positive = pair_examples(patch_labels(label, tuple(feats.shape[-2:]), dataset.ignore_index, num_classes))
            hists[key].add(cosine_similarity(feats)[0].cpu().numpy()[v_valid], v_positive[v_valid])
        if (index + 1) % 50 == 0 or index + 1 == total:
            print(f"fig1: {index + 1}/{total} images", file=__import__("sys").stderr, flush=True)
    data = fig1_data(hists)
    data.update(dataset=dataset.preset.key, images=total, complete=total == len(dataset), clip=clip_name,
                size=size, random_weights=bool(random_weights))
    return write_fig1(out, data, spec)


def fig1_data(hists: Mapping[str, PairHistogram]) -> dict:
    """The numbers of Fig. 1: per score, AP (and its binning bound), counts and the PR curve."""
    scores = {}
    for name, hist in hists.items():
        ap, bound = hist.average_precision()
        positives, negatives = hist.counts()
        scores[name] = {"ap": ap, "ap_bound": bound, "positives": positives, "negatives": negatives,
                        "curve": hist.pr_curve()}
    return {"scores": scores}


def write_fig1(out: Path, data: dict, spec: Mapping[str, Any]) -> list[Path]:
    plt = _pyplot()
    from ..images import write_atomically

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, s in data["scores"].items():
        ax.plot(s["curve"]["recall"], s["curve"]["precision"], label=f"{name} (AP {100 * s['ap']:.1f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    title = f"same label or not: {data.get('dataset', '')}, {data.get('images', '?')} images"
    if data.get("random_weights"):
        title += " (RANDOM weights: meaningless)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    rows = ["score,recall,precision,threshold"]
    for name, s in data["scores"].items():
        c = s["curve"]
        rows += [f"{name},{r:.6g},{p:.6g},{t:.6g}" for r, p, t in zip(c["recall"], c["precision"], c["threshold"])]
    png = _figure_image(fig, plt)
    paths = {out / "fig1.png": png, out / "fig1.json": json.dumps({**data, "notes": spec.get("notes", [])}, indent=1) + "\n",
             out / "fig1.csv": "\n".join(rows) + "\n"}
    write_atomically(paths)
    return list(paths)


# ---- Fig. 4: similarity distributions ---------------------------------------------------------------------


class ValueHistogram:
    """A histogram of values in [low, high] with ``bins`` equal bins (values outside are clipped
    into the end bins and counted)."""

    def __init__(self, low: float, high: float, bins: int):
        self.low, self.high, self.bins = float(low), float(high), int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.bins

    def add(self, values: np.ndarray) -> None:
        index = np.floor((np.asarray(values, dtype=np.float64).ravel() - self.low) / self.width).astype(np.int64)
        self.counts += np.bincount(index.clip(0, self.bins - 1), minlength=self.bins)

    def median(self) -> tuple[float, float]:
        """(median, error): the middle of the bin holding the median (the lower median for an even
        count) and half a bin width, a bound on the distance to the exact median."""
        total = int(self.counts.sum())
        if total == 0:
            return float("nan"), 0.0
        index = int(np.searchsorted(np.cumsum(self.counts), (total + 1) // 2))
        return self.low + (index + 0.5) * self.width, self.width / 2

    def edges(self) -> np.ndarray:
        return self.low + self.width * np.arange(self.bins + 1)


def window_similarities(feats, beta: float, gamma: float):
    """S (eq. 4) and A (eq. 6, the mean per window) of N windows' features, N x L x L each."""
    from ..model.attention import normalised_similarity

    return cosine_similarity(feats), normalised_similarity(feats, beta, gamma)


def make_fig4(spec: Mapping[str, Any], dataset, ctx, out: Path, *, device, dtype, random_weights: bool = False) -> list[Path]:
    """Fig. 4 on the first ``limit`` images of ``dataset``: S and A over every pair of patches of
    every sliding window, per VFM."""
    import torch

    from ..images import load_image
    from ..model.config import ProxyCLIPConfig
    from ..model.methods import Windows
    from ..model.segmenter import ProxyCLIP
    from ..model.sliding import crop_windows, window_boxes
    from ..model.vfm import VFM_BUILDERS
    from .runner import dataset_settings

    limit = ctx.limit if ctx.limit is not None else spec.get("limit")
    total = len(dataset) if limit is None else min(int(limit), len(dataset))
    clip_name = ctx.clip or spec.get("clip", "ViT-B-16")
    settings = dataset_settings("proxyclip", dataset.preset, ctx.overrides)
    config = ProxyCLIPConfig.create(clip=clip_name, clip_pretrained=ctx.clip_pretrained, method="clip", **settings)
    base = ProxyCLIP.build(config, clip_weights=ctx.weights.clip_file(clip_name), random_weights=random_weights,
                           device=device, dtype=dtype)
    beta, gamma = float(spec.get("beta", 1.2)), float(spec.get("gamma", 3.0))
    result = {}
    for key in spec.get("vfms", []):
        if key not in VFM_BUILDERS:
            raise ProxyCLIPError(f"VFM {key!r} is not available; choose from {', '.join(VFM_BUILDERS)}")
        vfm = VFM_BUILDERS[key](weights=ctx.weights.vfm_file(key), random_weights=random_weights).to(dtype)
        model = ProxyCLIP(base.clip_model, base.tokenizer, vfm, config.updated(method="proxyclip", vfm=key)).to(device)
        before, after = ValueHistogram(-1.0, 1.0, 4000), ValueHistogram(-gamma * (1 + beta), gamma * (1 + beta), 8000)
        for index in range(total):
            pixels = model.preprocess(load_image(dataset.samples[index].image))  # 3 x h x w
            boxes = window_boxes(pixels.shape[1], pixels.shape[2], config.window, config.stride)
            crops, _ = crop_windows(pixels, boxes, config.pad_multiple)
            for start in range(0, len(crops), config.window_batch):
                with torch.inference_mode():
                    batch = crops[start : start + config.window_batch].float()
                    feats = Windows(source=batch, clip=model.clip, vfm=model.vfm, window=config.window,
                                    to_vfm_input=model.to_vfm_input).vfm_features()
                    s, a = window_similarities(feats, beta, gamma)
                before.add(s.cpu().numpy())
                after.add(a.cpu().numpy())
        del model, vfm
        result[key] = fig4_entry(before, after)
    data = {"dataset": dataset.preset.key, "images": total, "beta": beta, "gamma": gamma, "vfms": result,
            "published_medians": spec.get("published_medians", {}), "random_weights": bool(random_weights)}
    return write_fig4(out, data, spec, {k: v for k, v in result.items()})


def fig4_entry(before: ValueHistogram, after: ValueHistogram) -> dict:
    m0, e0 = before.median()
    m1, e1 = after.median()
    return {"median_before": m0, "median_before_error": e0, "median_after": m1, "median_after_error": e1,
            "pairs": int(before.counts.sum()),
            "before": {"low": before.low, "high": before.high, "counts": before.counts.tolist()},
            "after": {"low": after.low, "high": after.high, "counts": after.counts.tolist()}}


def write_fig4(out: Path, data: dict, spec: Mapping[str, Any], entries: Mapping[str, dict]) -> list[Path]:
    plt = _pyplot()
    from ..images import write_atomically

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, e in entries.items():
        for ax, part, med in ((axes[0], "before", e["median_before"]), (axes[1], "after", e["median_after"])):
            h = e[part]
            counts = np.asarray(h["counts"], dtype=np.float64)
            edges = np.linspace(h["low"], h["high"], len(counts) + 1)
            merge = max(1, len(counts) // 200)  # plot 200 bars' worth
            c = counts[: len(counts) // merge * merge].reshape(-1, merge).sum(axis=1)
            centres = edges[: len(c) * merge : merge] + (edges[1] - edges[0]) * merge / 2
            ax.plot(centres, c / max(c.sum(), 1), label=f"{key} (median {med:.2f})")
    axes[0].set_title("cosine similarity S (eq. 4)")
    axes[1].set_title(f"normalised A = {data['gamma']:g} (S - {data['beta']:g} mean S) (eq. 6)")
    for ax in axes:
        ax.set_ylabel("fraction of pairs")
        ax.legend(fontsize=8)
    if data.get("random_weights"):
        fig.suptitle("RANDOM weights: these distributions mean nothing", fontsize=9)
    rows = ["vfm,median_before,median_before_error,median_after,median_after_error,published_median_before,pairs"]
    for key, e in entries.items():
        pub = data["published_medians"].get(key)
        rows.append(f"{key},{e['median_before']:.4f},{e['median_before_error']:.4f},{e['median_after']:.4f},"
                    f"{e['median_after_error']:.4f},{'' if pub is None else pub},{e['pairs']}")
    png = _figure_image(fig, plt)
    paths = {out / "fig4.png": png, out / "fig4.json": json.dumps({**data, "notes": spec.get("notes", [])}) + "\n",
             out / "fig4.csv": "\n".join(rows) + "\n"}
    write_atomically(paths)
    return list(paths)


# ---- Fig. 8: sweeps ---------------------------------------------------------------------------------------


def sweep_series(spec: Mapping[str, Any], records: Sequence[dict]) -> list[dict]:
    """Per sweep, the curves of Fig. 8: for each column (dataset), our mIoU at each value (None where
    not run). ``records`` are :func:`proxyclip.evaluation.grid.render_table` records, one per sweep."""
    series = []
    for sweep, record in zip(spec["sweeps"], records):
        curves = {}
        for column in record["columns"]:
            curves[column["title"]] = [row["cells"][column["key"]]["ours"] for row in record["rows"]]
        partial = any(c.get("partial") for row in record["rows"] for c in row["cells"].values())
        series.append({"option": sweep["option"], "values": list(sweep["values"]), "mIoU": curves, "partial": partial})
    return series


def write_sweep_figure(out: Path, spec: Mapping[str, Any], records: Sequence[dict]) -> list[Path]:
    plt = _pyplot()
    from ..images import write_atomically

    series = sweep_series(spec, records)
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, s in zip(axes[0], series):
        for title, values in s["mIoU"].items():
            points = [(x, y) for x, y in zip(s["values"], values) if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=title)
        ax.set_xlabel(s["option"])
        ax.set_ylabel("mIoU (%)" + (" * partial (--limit)" if s["partial"] else ""))
        ax.legend(fontsize=8)
    rows = ["option,value," + ",".join(series[0]["mIoU"]) if series else "option,value"]
    for s in series:
        for i, value in enumerate(s["values"]):
            rows.append(f"{s['option']},{value}," + ",".join("" if v[i] is None else f"{v[i]}" for v in s["mIoU"].values()))
    name = spec["name"]
    paths = {out / f"{name}.png": _figure_image(fig, plt), out / f"{name}.csv": "\n".join(rows) + "\n",
             out / f"{name}.json": json.dumps({"name": name, "series": series, "notes": spec.get("notes", [])}, indent=1) + "\n"}
    write_atomically(paths)
    return list(paths)


# ---- Figs. 5-7: qualitative grids ------------------------------------------------------------------------


def compare_panels(image: np.ndarray, labelings: Sequence[tuple[str, np.ndarray]], names: Sequence[str]):
    """The image, then one overlay per method or configuration (each with its legend), side by side
    under their titles.

    Args:
        image: H x W x 3 uint8.
        labelings: (title, H x W int labels) per column.
        names: class names in label order.

    Returns:
        A PIL image.
    """
    from PIL import Image, ImageDraw, ImageFont

    from ..images import overlay_image

    panels = [("image", Image.fromarray(image))] + [(title, overlay_image(image, labels, names)) for title, labels in labelings]
    size = max(12, min(24, image.shape[0] // 20))
    font = ImageFont.load_default(size=size)
    bar = size + 12
    width = sum(p.width for _, p in panels) + 8 * (len(panels) - 1)
    height = max(p.height for _, p in panels) + bar
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, panel in panels:
        draw.text((x + 4, 4), title, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, bar))
        x += panel.width + 8
    return canvas


# ---- plotting helpers --------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ProxyCLIPError("the figures need matplotlib (a dependency of proxyclip): pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_image(fig, plt):
    """The figure as a PIL image (written as PNG by write_atomically)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as img:
        return img.convert("RGB")
