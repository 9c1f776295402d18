"""Fonts for the legends of overlays: names in any script, never drawn as boxes.

Pillow's built-in font covers ASCII only (``café`` would come out as ``caf`` and a box). Each
legend line is drawn with the first font that has a glyph for every character of it (checked in
the font's character map, its ``cmap`` table, read with fontTools), or, when none has them all,
each character with the first font that has it. The fonts, in order:

1. DejaVu Sans as matplotlib ships it (Latin, Greek, Cyrillic and more; matplotlib is a
   dependency for this file only and is never imported);
2. the system's fonts that fontconfig (``fc-match``) proposes for the missing characters, e.g.
   Noto Sans CJK or Droid Sans Fallback for Chinese, Japanese and Korean where installed.

Characters no font has are drawn without their accents where the font has the base letter,
else as ``?``, and a warning names the class: never as boxes.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

__all__ = ["FontFile", "candidate_fonts", "covers", "legend_runs"]


@dataclass(frozen=True)
class FontFile:
    """A font file and, for a collection (.ttc), the index of the face in it."""

    path: str
    index: int = 0


@functools.cache
def bundled_fonts() -> tuple[FontFile, ...]:
    """The fonts a dependency ships: DejaVu Sans from matplotlib's data folder (found, not imported)."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return (FontFile(str(path)),)
    return ()


@functools.cache
def charmap(font: FontFile) -> frozenset[int]:
    """The code points ``font`` has glyphs for (its best cmap table); empty if it cannot be read."""
    from fontTools.ttLib import TTFont, TTLibError

    try:
        with TTFont(font.path, fontNumber=font.index, lazy=True) as tt:
            return frozenset(tt.getBestCmap() or ())
    except (OSError, TTLibError, AssertionError, ValueError):
        return frozenset()


def _drawable(text: str) -> str:
    """``text`` without control and format characters (nothing to draw; fonts may lack them)."""
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf"))


def _needed(text: str) -> frozenset[int]:
    """The code points of ``text`` that need a glyph."""
    return frozenset(ord(c) for c in _drawable(text))


def covers(font: FontFile, text: str) -> bool:
    """Whether ``font`` has a glyph for every character of ``text``."""
    return _needed(text) <= charmap(font)


@functools.cache
def system_fonts(code_points: frozenset[int], limit: int = 8) -> tuple[FontFile, ...]:
    """Up to ``limit`` system fonts fontconfig ranks best for these characters (none without fontconfig)."""
    exe = shutil.which("fc-match")
    if exe is None or not code_points:
        return ()
    charset = " ".join(f"{c:x}" for c in sorted(code_points))
    try:
        out = subprocess.run([exe, "-s", "--format=%{file}\t%{index}\n", f"sans-serif:charset={charset}"],
                             capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    fonts = []
    for line in out.splitlines():
        path, _, index = line.partition("\t")
        if path.lower().endswith((".ttf", ".otf", ".ttc", ".otc")) and Path(path).is_file():
            fonts.append(FontFile(path, int(index) if index.isdigit() else 0))
        if len(fonts) == limit:
            break
    return tuple(fonts)


def candidate_fonts(text: str) -> tuple[FontFile, ...]:
    """The fonts tried for ``text``, in order: the bundled ones, then the system's for what they miss."""
    bundled = bundled_fonts()
    missing = _needed(text) - frozenset().union(*(charmap(f) for f in bundled))
    return bundled + tuple(f for f in system_fonts(missing) if f not in bundled) if missing else bundled


@functools.cache
def _truetype(font: FontFile | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if font is None:  # no font file at all (matplotlib missing, no fontconfig): Pillow's, ASCII only
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(font.path, size, index=font.index)


_ASCII = frozenset(range(0x20, 0x7F))
_warned: set[str] = set()


def _replacement(c: str, have: frozenset[int]) -> str:
    """A character without a glyph -> its base letter if the font has it (é -> e), else "?"."""
    base = "".join(b for b in unicodedata.normalize("NFKD", c) if not unicodedata.combining(b))
    return base if base and all(ord(b) in have for b in base) else "?"


def legend_runs(text: str, size: int, name: str | None = None) -> list[tuple[ImageFont.FreeTypeFont, str]]:
    """How to draw ``text`` at ``size`` pixels: (font, piece of text) runs, drawn one after the other.

    One run when a font covers the whole text (the first candidate that does); otherwise each
    character goes to the first font that has it (e.g. Latin in DejaVu Sans, Chinese in a CJK
    font). Characters no font has are drawn as their base letter or "?", and a ``UserWarning``
    names the class ``name`` (once per name).
    """
    text = _drawable(text)
    fonts = candidate_fonts(text)
    for font in fonts:
        if covers(font, text):
            return [(_truetype(font, size), text)]
    runs: list[list] = []
    lacking = []
    for c in text:
        font = next((f for f in fonts if ord(c) in charmap(f)), None)
        if font is None:
            lacking.append(c)
            font = fonts[0] if fonts else None
            c = _replacement(c, charmap(font) if font else _ASCII)
        if runs and runs[-1][0] == font:
            runs[-1][1] += c
        else:
            runs.append([font, c])
    label = text if name is None else name
    if lacking and label not in _warned:
        _warned.add(label)
        shown = "".join(piece for _, piece in runs)
        warnings.warn(f"no font has glyphs for {''.join(dict.fromkeys(lacking))!r} in the class name {label!r}; "
                      f"legends show {shown!r}. Install a font that covers it (e.g. Noto Sans CJK for Chinese, "
                      "Japanese and Korean) to see it as written", UserWarning, stacklevel=2)
    return [(_truetype(font, size), piece) for font, piece in runs]
