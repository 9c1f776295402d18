"""Reading and resizing images in background DataLoader workers, for ``eval`` and ``segment`` alike.

The model runs in the main process while ``workers`` processes decode each image and resize it by
the configuration's rule (what :meth:`ProxyCLIP.preprocess` would do), so the model sees a small
uint8 array and never waits for a decoder. A file that cannot be read becomes an item with an
``error`` message instead of an exception, so that one bad file neither kills a worker nor stops
the others.

torch is imported inside the functions: :func:`default_workers` is read when the command line is
built, which must stay light.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ProxyCLIPError

if TYPE_CHECKING:
    import numpy as np
    import torch


def default_workers() -> int:
    """Loader processes: min(4, CPU count)."""
    return min(4, os.cpu_count() or 1)


def read_resized(path: str | Path, short_side: int | None, long_side: int) -> tuple[np.ndarray, np.ndarray]:
    """An image file as the model's input: (original H x W x 3 uint8, resized h x w x 3 uint8).

    The resize is :func:`proxyclip.images.resize_keep_ratio` (none when ``short_side`` is None);
    the resized array is the original itself when the size does not change.

    Raises:
        ImageError: the file cannot be read as an image.
    """
    import torch

    from .images import load_image, resize_keep_ratio

    image = load_image(path)  # H x W x 3 uint8
    if short_side is None:
        return image, image
    pixels = torch.from_numpy(image).permute(2, 0, 1)  # 3 x H x W uint8, not copied (load_image's array is writable)
    resized = resize_keep_ratio(pixels, short_side, long_side)  # 3 x h x w
    return image, resized.permute(1, 2, 0).numpy()  # h x w x 3 uint8


def identity(item: dict) -> dict:
    """The DataLoader's collate function: items pass through one by one (sizes differ)."""
    return item


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM and SIGHUP to the main process, which shuts them down.

    A terminal closing sends SIGHUP to the whole process group: without this the workers would
    die first and the main process would report a crashed worker instead of stopping cleanly.
    """
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def make_loader(dataset: torch.utils.data.Dataset, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader that yields ``dataset``'s items one at a time, read by ``workers`` processes (0: here)."""
    import torch

    if workers < 0:
        raise ProxyCLIPError("--workers must be 0 or more")
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=identity,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
