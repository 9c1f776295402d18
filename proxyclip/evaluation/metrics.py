"""mIoU, aAcc and per-class IoU exactly as MMSegmentation's ``IoUMetric`` computes them.

For each image, pixels whose label is the ignore value are dropped; over the rest, per class c

    I_c = #{pred == label == c},  P_c = #{pred == c},  L_c = #{label == c},  U_c = P_c + L_c - I_c,

summed over the whole dataset. Then IoU_c = I_c / U_c and Acc_c = I_c / L_c (NaN where the
denominator is 0), mIoU = mean of IoU_c over classes with U_c > 0, mAcc likewise over L_c > 0,
aAcc = sum(I) / sum(L); reported in percent, rounded to two decimals as MMSegmentation does.

MMSegmentation counts with ``torch.histc(x, bins=C, min=0, max=C-1)``, which skips values outside
[0, C-1]. So does this module: a label outside [0, C) that is not the ignore value adds nothing
to L (nor I), but the prediction at that pixel still adds to P. That is how ADE847's void
(65535) pixels counted against every class in the published runs, which ignored 255 instead.
The counts here are exact int64 sums; MMSegmentation sums float32 histograms, which can differ
from the exact counts in the seventh significant digit on the largest datasets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

AREA_ROWS = ("intersect", "pred", "label")  # rows of an areas tensor; union = pred + label - intersect


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Per-class pixel counts of one image.

    Args:
        pred: H x W integer class indices in [0, num_classes).
        label: H x W integer ground truth (any integer dtype; values outside [0, C) are skipped).
        num_classes: C.
        ignore_index: label value whose pixels are dropped entirely.

    Returns:
        3 x C int64: rows intersect, pred, label (see ``AREA_ROWS``).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size")
    label = label.to(torch.int64)
    pred = pred.to(torch.int64)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]  # N each

    def count(values: torch.Tensor) -> torch.Tensor:  # histc(min=0, max=C-1) on integers
        values = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(values, minlength=num_classes)  # C

    return torch.stack([count(pred[pred == label]), count(pred), count(label)])  # 3 x C


def summarize(areas: torch.Tensor | np.ndarray, class_names: Sequence[str]) -> dict:
    """Dataset-level metrics from summed areas (3 x C, rows as in ``AREA_ROWS``).

    Returns a dict: ``aAcc``, ``mIoU``, ``mAcc`` (percent, two decimals), ``per_class``
    (one {"class", "IoU", "Acc"} per class, None where it has no union / no label pixels),
    ``num_classes_scored`` (classes with a non-zero union).
    """
    areas = torch.as_tensor(np.asarray(areas), dtype=torch.int64)
    if areas.shape != (3, len(class_names)):
        raise ValueError(f"areas must be 3 x {len(class_names)}, got {tuple(areas.shape)}")
    intersect, pred, label = areas.double()
    union = pred + label - intersect
    iou = (intersect / union).numpy()  # NaN where union == 0
    acc = (intersect / label).numpy()  # NaN where label == 0
    total = label.sum().item()

    def pct(x: float) -> float | None:
        return None if np.isnan(x) else float(np.round(x * 100, 2))

    with warnings.catch_warnings():  # nanmean of all-NaN warns; an empty dataset gives None
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "aAcc": pct(intersect.sum().item() / total if total else float("nan")),
            "mIoU": pct(np.nanmean(iou)),
            "mAcc": pct(np.nanmean(acc)),
            "num_classes_scored": int((union > 0).sum()),
            "per_class": [{"class": n, "IoU": pct(i), "Acc": pct(a)} for n, i, a in zip(class_names, iou, acc)],
        }

