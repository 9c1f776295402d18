"""Reading images robustly, resizing them as the protocol does, and writing label maps."""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

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
    return img if img.mode == "RGB" else img.convert("RGB")  # convert("RGB") would copy an RGB image


MAX_PIXELS_ENV = "PROXYCLIP_MAX_PIXELS"  # set by --max-pixels; read by every process, loader workers included
_BAND_PIXELS = 1 << 18  # pixels per band when large images are copied, blended or counted a band at a time


def pixel_limit() -> int | None:
    """The largest image :func:`load_image` decodes, in pixels: the limit :func:`set_pixel_limit` set
    (``--max-pixels``), else Pillow's ``Image.MAX_IMAGE_PIXELS`` (89,478,485; None: no limit).
    The limit guards against decompression bombs: small files that decode to huge images."""
    value = os.environ.get(MAX_PIXELS_ENV)
    return int(value) if value else Image.MAX_IMAGE_PIXELS


def set_pixel_limit(limit: int) -> None:
    """Decode images of up to ``limit`` pixels, in this process and in the processes it starts.

    Also sets Pillow's own limit (``Image.MAX_IMAGE_PIXELS``), so that label maps read with
    Pillow follow it too.
    """
    if limit < 1:
        raise ValueError(f"the pixel limit must be positive, got {limit}")
    os.environ[MAX_PIXELS_ENV] = str(int(limit))
    Image.MAX_IMAGE_PIXELS = int(limit)


def _too_large(path: Path, pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> ImageError:
    what = f"{size[0]} x {size[1]} = {pixels:,} pixels" if size and pixels else (
        f"{pixels:,} pixels" if pixels else "too many pixels")
    more = f" {pixels}" if pixels else " N"
    return ImageError(f"{path}: the image has {what}, over the limit of {limit:,} that guards against "
                      f"decompression bombs; if you trust the file, raise the limit with --max-pixels{more} "
                      "(in Python: proxyclip.images.set_pixel_limit)")


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """An RGB PIL image -> a new writable H x W x 3 uint8 array, copied a band of rows at a time
    (``np.asarray`` would hold two more full-size copies of the bytes meanwhile)."""
    width, height = img.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, width))
    if rows >= height:
        out[:] = np.asarray(img)
        return out
    for top in range(0, height, rows):
        out[top : top + rows] = np.asarray(img.crop((0, top, width, min(top + rows, height))))
    return out


def load_image(image: ImageInput) -> np.ndarray:
    """Read an image as an H x W x 3 uint8 RGB array.

    Paths are decoded fully (truncated files fail here, not later), EXIF orientation is
    applied, and grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB.
    A file is decoded once and copied once (no full-size intermediate copies). Files with more
    pixels than :func:`pixel_limit` are refused before they are decoded.

    Raises:
        ImageError: the file is missing, not an image, corrupt, truncated or too large.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, Image.Image):
        return _pil_to_array(_to_rgb(ImageOps.exif_transpose(image) or image))
    path = Path(image)
    limit = pixel_limit()
    if limit is not None and Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit  # a process that got the limit through the environment (a loader worker)
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit (checked here, with the size in the message) and fails above twice it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if limit is not None and img.width * img.height > limit:
                    raise _too_large(path, img.width * img.height, limit, img.size)
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                rgb = _to_rgb(img)
                if rgb.width < 1 or rgb.height < 1:
                    raise ImageError(f"{path}: the image is empty")
                return _pil_to_array(rgb)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else None,
                         limit if limit is not None else Image.MAX_IMAGE_PIXELS or 0) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        reason = "not an image or an unsupported format" if isinstance(exc, Image.UnidentifiedImageError) else str(exc)
        raise ImageError(f"{path}: cannot read the image ({reason})") from None


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

# Class 0 would be black in VOC's palette: invisible on an overlay (and on dark images). It gets
# amber instead, a colour outside VOC's first 256 (whose channels are multiples of 32).
CLASS_0_COLOUR = (255, 176, 0)


def palette(num_classes: int) -> np.ndarray:
    """num_classes x 3 uint8 colours: PASCAL VOC's bit-interleaved palette (as seg tools use), except
    class 0, which gets :data:`CLASS_0_COLOUR` instead of black; all distinct, none black."""
    idx = np.arange(num_classes)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):
        for ch in range(3):
            colours[:, ch] |= ((idx >> (3 * shift + ch)) & 1) << (7 - shift)
    if num_classes:
        colours[0] = CLASS_0_COLOUR
    return colours.astype(np.uint8)


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest integer dtype for labels of ``num_classes`` classes: uint8 up to 256, then
    int16, then int32 (a 9000 x 9000 label map: 81 MB in uint8, 648 MB in int64)."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.int16 if num_classes <= 32768 else np.int32)


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """H x W labels of ``num_classes`` classes -> a palette PNG image (up to 256 classes) or 16-bit
    grayscale (more), decided by the class count so that every image of a run has one format."""
    if num_classes <= 256:
        img = Image.fromarray(labels.astype(np.uint8, copy=False), mode="P")
        img.putpalette(palette(256).flatten().tolist())
        return img
    return Image.fromarray(labels.astype(np.uint16, copy=False))


def class_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel count of each class 0..max(labels) (int64), counted a band at a time (no sorted copy)."""
    flat = labels.reshape(-1)
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, flat.size, _BAND_PIXELS):
        part = np.bincount(flat[start : start + _BAND_PIXELS])  # converts the chunk to int64
        if part.size > counts.size:
            part[: counts.size] += counts
            counts = part
        else:
            counts[: part.size] += part
    return counts


def classes_by_area(labels: np.ndarray) -> list[tuple[int, float]]:
    """(class, share of the pixels) of each class present in ``labels``, largest first (ties: lower class first)."""
    counts = class_areas(labels)
    present = np.flatnonzero(counts)
    order = np.argsort(-counts[present], kind="stable")
    return [(int(present[i]), float(counts[present[i]] / labels.size)) for i in order]


def legend_font_size(height: int, width: int) -> int:
    """Legend text height in pixels for an overlay of an image this size: 1/30 of the short side, at
    least 12, so that the legend stays legible when a large overlay is viewed shrunk to a screen."""
    return max(12, round(min(height, width) / 30))


@dataclass(frozen=True)
class _LegendItem:
    colour: tuple[int, int, int]
    runs: list  # (font, text) pieces drawn one after the other (proxyclip.fonts.legend_runs)
    width: int  # swatch, gap and text, in pixels


def _legend_items(present, names, colours, size) -> list[_LegendItem]:
    from .fonts import legend_runs

    items = []
    for c, share in present:
        name = names[c] if c < len(names) else f"class {c}"
        runs = legend_runs(f"{name}  {100 * share:.1f}%" if share >= 0.0005 else f"{name}  <0.1%", size, name=name)
        text_w = sum(font.getlength(piece) for font, piece in runs)
        items.append(_LegendItem(tuple(int(v) for v in colours[c]), runs, size + max(4, size // 2) + math.ceil(text_w)))
    return items


def overlay_image(
    image: np.ndarray, labels: np.ndarray, names: Sequence[str], alpha: float = 0.5,
    legend: str = "right", font_size: int | None = None,
) -> Image.Image:
    """The image blended with class colours, and a legend of the classes present (by area).

    Args:
        image: H x W x 3 uint8.
        labels: H x W integer class indices (any integer dtype).
        names: the class names, in label order (any script; see :mod:`proxyclip.fonts`).
        alpha: opacity of the class colours.
        legend: "right" (columns beside the image, as many as its height needs) or "below"
            (rows under the image, as wide as it).
        font_size: legend text height in pixels (default: :func:`legend_font_size`).

    Memory: the blend is computed a band of rows at a time into the output image; the only
    full-size allocation is the output itself.
    """
    if legend not in ("right", "below"):
        raise ValueError(f"legend must be 'right' or 'below', got {legend!r}")
    height, width = labels.shape
    colours = palette(max(len(names), int(labels.max(initial=0)) + 1, 1))
    size = font_size or legend_font_size(height, width)
    items = _legend_items(classes_by_area(labels), names, colours, size)
    row, margin, gap = size + max(6, size // 3), max(6, size // 2), max(8, size)
    # Positions of the items relative to the legend's corner.
    places: list[tuple[int, int]] = []
    if legend == "right":
        per_column = max(1, (height - 2 * margin) // row)
        x = 0
        for start in range(0, len(items), per_column):
            column = items[start : start + per_column]
            places += [(x, i * row) for i in range(len(column))]
            x += max(item.width for item in column) + gap
        legend_w, legend_h = x - gap, min(len(items), per_column) * row
        canvas_size = (width + margin + legend_w + margin, max(height, legend_h + 2 * margin))
        origin = (width + margin, margin)
    else:
        x = y = 0
        for item in items:
            if x and x + item.width > width - 2 * margin:
                x, y = 0, y + row
            places.append((x, y))
            x += item.width + gap
        legend_w = max([p[0] + it.width for p, it in zip(places, items)], default=0)
        canvas_size = (max(width, legend_w + 2 * margin), height + margin + y + row + margin)
        origin = (margin, height + margin)
    canvas = Image.new("RGB", canvas_size, (255, 255, 255))
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        band = image[top : top + rows].astype(np.float32)
        band *= 1 - alpha
        colour = colours[labels[top : top + rows]].astype(np.float32)
        colour *= alpha
        band += colour
        canvas.paste(Image.fromarray(np.round(band, out=band).astype(np.uint8)), (0, top))
    draw = ImageDraw.Draw(canvas)
    for (x, y), item in zip(places, items):
        x, y = origin[0] + x, origin[1] + y
        draw.rectangle([x, y, x + size, y + size], fill=item.colour, outline=(0, 0, 0), width=max(1, size // 16))
        ascent, descent = item.runs[0][0].getmetrics()
        baseline = y + size / 2 + (ascent - descent) / 2  # the text centred on the swatch
        x += size + max(4, size // 2)
        for font, piece in item.runs:
            draw.text((x, baseline), piece, fill=(0, 0, 0), font=font, anchor="ls")
            x += font.getlength(piece)
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
