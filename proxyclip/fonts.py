"""Fonts for the legends of overlays: names in any script, never drawn as boxes.

Pillow's built-in font covers ASCII only (``café`` would come out as ``caf`` and a box). Each
legend line is drawn with the first font that has a glyph for every character of it, checked in
the font's character map (its ``cmap`` table, read with fontTools):

1. DejaVu Sans as matplotlib ships it (Latin, Greek, Cyrillic and more; matplotlib is a
   dependency for this file only and is never imported);
2. the system's fonts that fontconfig (``fc-match``) proposes for the missing characters, e.g.
   Noto Sans CJK or Droid Sans Fallback for Chinese, Japanese and Korean where installed.

When no font covers a name, its uncovered characters are drawn without their accents where the
font has the base letter, else as ``?``, and a warning names the class.
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

__all__ = ["FontFile", "candidate_fonts", "covers", "legend_font"]


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


def _needed(text: str) -> frozenset[int]:
    """The code points of ``text`` that need a glyph (control and format characters do not)."""
    return frozenset(ord(c) for c in text if unicodedata.category(c)[0] != "C")


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
    if any(covers(f, text) for f in bundled):
        return bundled
    missing = _needed(text) - frozenset().union(*(charmap(f) for f in bundled))
    return bundled + tuple(f for f in system_fonts(missing) if f not in bundled)


@functools.cache
def _truetype(font: FontFile, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font.path, size, index=font.index)


_warned: set[str] = set()


def _replace_missing(text: str, have: frozenset[int]) -> str:
    """Characters without a glyph -> their base letter if the font has it (é -> e), else "?"."""
    out = []
    for c in text:
        if ord(c) in have or unicodedata.category(c)[0] == "C":
            out.append(c)
            continue
        base = "".join(b for b in unicodedata.normalize("NFKD", c) if not unicodedata.combining(b))
        out.append(base if base and all(ord(b) in have for b in base) else "?")
    return "".join(out)


def legend_font(text: str, size: int, name: str | None = None) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, str]:
    """A font of ``size`` pixels that draws ``text``, and the text to draw with it.

    The text comes back unchanged when some font covers it; otherwise it is drawn with the
    font that covers the most of it, with the other characters replaced (see the module's
    docstring), and a ``UserWarning`` names the class ``name`` (once per name).
    """
    fonts = candidate_fonts(text)
    for font in fonts:
        if covers(font, text):
            return _truetype(font, size), text
    needed = _needed(text)
    best = max(fonts, key=lambda f: len(needed & charmap(f)), default=None)
    have = charmap(best) if best else frozenset(range(0x20, 0x7F))
    drawn = _replace_missing(text, have)
    label = name if name is not None else text
    if label not in _warned:
        _warned.add(label)
        lacking = "".join(sorted({c for c in text if ord(c) in needed - have}))
        warnings.warn(f"no font has glyphs for {lacking!r} of the class name {label!r}; legends show it as "
                      f"{_replace_missing(label, have)!r}. Install a font that covers it (e.g. Noto Sans CJK for "
                      "Chinese, Japanese, Korean) to see it as written", UserWarning, stacklevel=2)
    font = _truetype(best, size) if best else ImageFont.load_default(size=size)
    return font, drawn
