"""Sliding-window inference as in the published runs (MMSegmentation's ``slide`` mode).

Windows that would run past the border are shifted back inside it; a window cut from an image
smaller than the window is zero-padded (in CLIP-normalised space), evenly on both sides, up to a
multiple of ``pad_multiple`` pixels, and the padding is cut off its logits. Logits of overlapping
windows are averaged. All windows of an image have one size, so they run as one batch, and the
windows of several images of the same window size share batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # y1, y2, x1, x2


def window_boxes(height: int, width: int, window: int, stride: int) -> list[Box]:
    """Window positions covering an image, row by row, in the published order."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, height), min(c * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def pad_amounts(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to a multiple of ``multiple``, split evenly."""
    def split(n: int) -> tuple[int, int]:
        extra = (multiple - n % multiple) % multiple
        return extra // 2, extra - extra // 2

    (left, right), (top, bottom) = split(width), split(height)
    return left, right, top, bottom


def crop_windows(image: torch.Tensor, boxes: list[Box], pad_multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Cut the windows of one image and pad them.

    Args:
        image: 3 x H x W.
        boxes: from :func:`window_boxes`; all of one size.

    Returns:
        N x 3 x h' x w' padded windows and the (left, right, top, bottom) padding.
    """
    crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # N x 3 x h x w
    pad = pad_amounts(crops.shape[-2], crops.shape[-1], pad_multiple)
    if any(pad):
        crops = F.pad(crops, pad)  # N x 3 x h' x w'
    return crops, pad


def slide_logits(
    images: Sequence[torch.Tensor],
    window_fn: Callable[[torch.Tensor], torch.Tensor],
    num_outputs: int,
    window: int,
    stride: int,
    pad_multiple: int = 56,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Average window logits over the windows that cover each pixel, for several images.

    The windows of all images are pooled and run through ``window_fn`` in batches of
    ``batch_size`` (windows of one padded size per batch); every statistic of the method is
    per window, so the batching changes no result.

    Args:
        images: 3 x H_i x W_i tensors, CLIP-normalised.
        window_fn: N x 3 x h x w windows -> N x Q x h x w logits (at the window's size).
        num_outputs: Q.

    Returns:
        For each image, Q x H_i x W_i float32 logits.
    """
    totals, counts, groups = [], [], {}
    for i, image in enumerate(images):
        _, height, width = image.shape
        boxes = window_boxes(height, width, window, stride)
        crops, pad = crop_windows(image, boxes, pad_multiple)
        totals.append(image.new_zeros((num_outputs, height, width), dtype=torch.float32))
        counts.append(image.new_zeros((1, height, width), dtype=torch.float32))
        group = groups.setdefault((tuple(crops.shape[-2:]), pad), ([], []))
        group[0].append(crops)  # n_i x 3 x h' x w'
        group[1].extend((i, box) for box in boxes)
    for (_, (left, _, top, _)), (crops, owners) in groups.items():
        crops = torch.cat(crops)  # N x 3 x h' x w'
        for start in range(0, len(owners), batch_size):
            logits = window_fn(crops[start : start + batch_size]).float()  # n x Q x h' x w'
            for (i, (y1, y2, x1, x2)), logit in zip(owners[start : start + batch_size], logits):
                totals[i][:, y1:y2, x1:x2] += logit[:, top : top + y2 - y1, left : left + x2 - x1]
                counts[i][:, y1:y2, x1:x2] += 1
    return [total / count for total, count in zip(totals, counts)]
