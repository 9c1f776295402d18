"""Reading images robustly, resizing them as the protocol does, and writing label maps."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import ImageError, OutputError

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit and float scaled to 8 bits, alpha composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode != "I" or arr.max() > 255 else 255
        img = Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(image: ImageInput) -> np.ndarray:
    """Read an image as an H x W x 3 uint8 RGB array.

    Paths are decoded fully (truncated files fail here, not later), EXIF orientation is
    applied, and grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB.

    Raises:
        ImageError: the file is missing, not an image, corrupt, truncated or too large.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, Image.Image):
        return np.asarray(_to_rgb(ImageOps.exif_transpose(image) or image))
    path = Path(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: image too large to process safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        reason = "not an image or an unsupported format" if isinstance(exc, Image.UnidentifiedImageError) else str(exc)
        raise ImageError(f"{path}: cannot read the image ({reason})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError(f"{path}: the image is empty")
    return np.asarray(rgb)


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"an image array must be H x W, H x W x 3 or H x W x 4, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
            arr = (arr * 255).round().astype(np.uint8)  # float images in [0, 1]
        elif np.issubdtype(arr.dtype, np.floating):
            raise ImageError(f"a float image array must hold finite values in [0, 1]; got values in "
                             f"[{np.nanmin(arr):g}, {np.nanmax(arr):g}]: scale it to [0, 1] or pass uint8 (0-255)")
        else:
            raise ImageError(f"image arrays must be uint8 (or uint16, or float in [0, 1]); got {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[..., 3:].astype(np.float32) / 255.0
        arr = (arr[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def rescaled_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """The (height, width) that mmcv's ``Resize(scale=(long_side, short_side), keep_ratio=True)``
    gives (``mmcv.rescale_size``): scale = min(max(scale) / long edge, min(scale) / short edge),
    each side ``int(side * scale + 0.5)`` (at least 1 pixel here; mmcv would fail on 0)."""
    big, small = max(long_side, short_side), min(long_side, short_side)  # mmcv: max / min of the scale tuple
    scale = min(big / max(height, width), small / min(height, width))
    return max(int(height * float(scale) + 0.5), 1), max(int(width * float(scale) + 0.5), 1)


def resize_keep_ratio(pixels: torch.Tensor, short_side: int, long_side: int) -> torch.Tensor:
    """Resize a 3 x H x W uint8 image to :func:`rescaled_size` exactly as the published pipeline
    (mmcv ``imrescale``, backend cv2): ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)``, OpenCV's
    fixed-point bilinear without antialiasing. Returns 3 x h x w uint8 (``pixels`` if unchanged)."""
    size = rescaled_size(pixels.shape[-2], pixels.shape[-1], short_side, long_side)
    if size == tuple(pixels.shape[-2:]):
        return pixels
    import cv2  # opencv-python-headless; imported here so that image IO alone does not load it

    hwc = np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())  # H x W x 3 uint8
    out = cv2.resize(hwc, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # cv2 takes (w, h)
    return torch.from_numpy(np.ascontiguousarray(out.reshape(size[0], size[1], -1))).permute(2, 0, 1)


# ---- writing -------------------------------------------------------------------------------

def palette(num_classes: int) -> np.ndarray:
    """num_classes x 3 uint8 colours: PASCAL VOC's bit-interleaved palette, as seg tools use."""
    idx = np.arange(num_classes)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):
        for ch in range(3):
            colours[:, ch] |= ((idx >> (3 * shift + ch)) & 1) << (7 - shift)
    return colours.astype(np.uint8)


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """H x W labels of ``num_classes`` classes -> a palette PNG image (up to 256 classes) or 16-bit
    grayscale (more), decided by the class count so that every image of a run has one format."""
    if num_classes <= 256:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(palette(256).flatten().tolist())
        return img
    return Image.fromarray(labels.astype(np.uint16))


def classes_by_area(labels: np.ndarray) -> list[tuple[int, float]]:
    """(class, share of the pixels) of each class present in ``labels``, largest first."""
    present, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [(int(present[i]), float(counts[i] / labels.size)) for i in order]


def overlay_image(
    image: np.ndarray, labels: np.ndarray, names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """The image blended with class colours, and a legend of the classes present (by area)."""
    colours = palette(max(len(names), 1))
    blend = (image.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha)
    base = Image.fromarray(blend.round().astype(np.uint8))
    present = classes_by_area(labels)
    size = max(12, min(24, base.height // 25))
    font = ImageFont.load_default(size=size)
    row = size + 8
    lines = [f"{names[c]}  {100 * share:.1f}%" for c, share in present]
    text_w = max(int(font.getlength(t)) for t in lines)
    width = base.width + text_w + row + 24
    height = max(base.height, row * len(lines) + 12)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = base.width + 8
    for i, ((c, _), text) in enumerate(zip(present, lines)):
        y = 6 + i * row
        draw.rectangle([x0, y, x0 + size, y + size], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
        draw.text((x0 + size + 8, y), text, fill=(0, 0, 0), font=font)
    return canvas


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(outputs: dict[Path, object]) -> None:
    """Write several files so that either all appear or none does.

    ``outputs`` maps a path to a PIL image (saved as PNG), a numpy array (saved as .npy), a
    string (saved as UTF-8 text) or bytes. Missing folders are created; each file is written to a
    temporary file beside it and flushed to disk, then all are renamed. The temporary files are
    removed whatever happens (an error, Ctrl-C, or SIGTERM / SIGHUP under the command line).

    Raises:
        OutputError: a file cannot be written (disk full, no permission, ...), naming it and its folder.
    """
    temps: list[tuple[Path, Path]] = []
    path = Path()
    try:
        for path, obj in outputs.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
            temps.append((Path(tmp), path))
            with os.fdopen(fd, "wb") as fh:
                if isinstance(obj, Image.Image):
                    obj.save(fh, format="PNG")
                elif isinstance(obj, str):
                    fh.write(obj.encode("utf-8"))
                elif isinstance(obj, bytes):
                    fh.write(obj)
                else:
                    np.save(fh, obj, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        mode = 0o666 & ~_umask()
        for tmp, path in temps:
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path.name} in {path.parent}: {exc.strerror or exc}") from exc
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
