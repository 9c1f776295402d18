"""Images named on a command line, streamed: files, folders (recursively), list files.

For ``proxyclip segment`` over any number of images: nothing per image is held beyond a 64-bit
hash of its output name (:func:`count_and_check`), and :class:`ImageStream` reads and resizes the
images of one process in DataLoader workers, skipping those whose outputs exist.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ProxyCLIPError
from .loading import read_resized

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

# output kind -> file name after the image's key
OUTPUT_SUFFIXES = {"labels": ".png", "overlay": "_overlay.png", "probs": "_probs.npy", "json": ".json"}


@dataclass(frozen=True)
class Input:
    """One image to segment and the name of its outputs."""

    path: str  # the file to read
    key: str  # output name relative to the output folder, without suffix, e.g. "street/0001"


def safe_key(path: str) -> str:
    """An output name that stays inside the output folder: no root, no "." or ".." parts, no suffix.

    Plain string operations: pathlib would intern every part of a million paths for good.
    """
    parts = [p for p in os.path.splitdrive(path)[1].split(os.sep) if p not in ("", ".", "..")]
    if not parts:
        return "_"
    parts[-1] = os.path.splitext(parts[-1])[0] or parts[-1]
    return "/".join(parts)


@dataclass(frozen=True)
class InputSpec:
    """What the command line names: image files and folders, list files, recursion. Iterating it
    streams :class:`Input` items in a fixed order (sorted folder listings), the same in every process.

    - a file: its output name is its stem;
    - a folder: the image files in it (by suffix; hidden ones skipped), and with ``recursive`` in
      its sub-folders, named by their path relative to the folder;
    - a list file: one path a line (blank lines and lines starting with # skipped), relative paths
      taken from the list's folder, each named by the path as written.
    """

    items: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    recursive: bool = False
    exclude: str | None = None  # a folder (its real path) never descended into: the output folder

    def __iter__(self) -> Iterator[Input]:
        for item in self.items:
            path = Path(item)
            if path.is_dir():
                found = False
                for found_input in self._walk(path, path, (os.path.realpath(path),)):
                    found = True
                    yield found_input
                if not found:
                    where = "or its sub-folders " if self.recursive else ""
                    hint = "" if self.recursive else " (add --recursive for sub-folders)"
                    raise ProxyCLIPError(f"folder {path} {where}holds no image files "
                                         f"({', '.join(sorted(IMAGE_SUFFIXES))}){hint}")
            else:
                yield Input(item, safe_key(os.path.basename(item)))
        for list_file in self.lists:
            yield from self._read_list(Path(list_file))

    def _walk(self, root: Path, folder: Path, ancestors: tuple[str, ...]) -> Iterator[Input]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise ProxyCLIPError(f"cannot list folder {folder}: {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith("."):  # hidden files, and our own temporary .part files
                continue
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if self.recursive and real != self.exclude and real not in ancestors:  # no symlink loops
                    yield from self._walk(root, Path(entry.path), (*ancestors, real))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                yield Input(entry.path, safe_key(os.path.relpath(entry.path, root)))

    @staticmethod
    def _read_list(list_file: Path) -> Iterator[Input]:
        try:
            fh = open(list_file, encoding="utf-8")
        except OSError as exc:
            raise ProxyCLIPError(f"cannot read list file {list_file}: {exc.strerror or exc}") from None
        folder = os.path.dirname(list_file)
        with fh:
            for line in fh:
                entry = line.rstrip("\r\n")
                if not entry.strip() or entry.lstrip().startswith("#"):
                    continue
                yield Input(os.path.join(folder, entry), safe_key(entry))  # an absolute entry stays as it is


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def count_and_check(spec: InputSpec) -> int:
    """The number of images ``spec`` names, after checking that no two write the same outputs.

    Holds 8 bytes per image (a hash of its output name), not the paths.

    Raises:
        ProxyCLIPError: no images, an empty folder, an unreadable list, or two images with one output name.
    """
    import numpy as np

    hashes = array("Q")
    for item in spec:
        hashes.append(_key_hash(item.key))
    if not hashes:
        raise ProxyCLIPError("no images given: name image files or folders, or --list FILE")
    ordered = np.sort(np.frombuffer(hashes, dtype=np.uint64))
    clashes = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if clashes:
        seen: dict[int, str] = {}
        for item in spec:
            h = _key_hash(item.key)
            if h in clashes:
                if h in seen:
                    raise ProxyCLIPError(f"{seen[h]} and {item.path} would write the same output names ({item.key}.*); "
                                         "rename one, or segment them in separate runs or into another --out")
                seen[h] = item.path
    return len(hashes)


def output_paths(out: Path, key: str, kinds: Sequence[str]) -> dict[str, Path]:
    """The files of one image, by kind (keys of :data:`OUTPUT_SUFFIXES`)."""
    return {kind: out / f"{key}{OUTPUT_SUFFIXES[kind]}" for kind in kinds}


class ImageStream(torch.utils.data.IterableDataset):
    """The images of process ``rank`` of ``world`` (image i to process i % world), read and resized
    by :func:`~proxyclip.loading.read_resized`; DataLoader workers take turns, so the order is kept.

    Items: ``{"index", "input"}`` plus ``"skipped": True`` (every output exists and not
    ``overwrite``), or ``"error"`` (a message), or ``"size"`` (H, W), ``"resized"`` (h x w x 3
    uint8) and ``"image"`` (H x W x 3 uint8 if ``keep_image``, else None).
    """

    def __init__(self, spec: InputSpec, out: Path, kinds: Sequence[str], *, overwrite: bool = False,
                 short_side: int | None = None, long_side: int = 2048, keep_image: bool = False,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.spec, self.out, self.kinds, self.overwrite = spec, Path(out), tuple(kinds), overwrite
        self.short_side, self.long_side, self.keep_image = short_side, long_side, keep_image
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = -1
        for index, item in enumerate(self.spec):
            if index % self.world != self.rank:
                continue
            mine += 1
            if mine % workers == worker:
                yield self.read(index, item)

    def read(self, index: int, item: Input) -> dict:
        record = {"index": index, "input": item}
        if not self.overwrite and all(p.exists() for p in output_paths(self.out, item.key, self.kinds).values()):
            return {**record, "skipped": True}
        try:
            image, resized = read_resized(item.path, self.short_side, self.long_side)
        except ProxyCLIPError as exc:
            return {**record, "error": str(exc)}
        return {**record, "size": image.shape[:2], "resized": resized, "image": image if self.keep_image else None}
