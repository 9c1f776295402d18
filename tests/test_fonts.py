"""Legends draw class names in any script: real glyphs, never the missing-glyph box."""

import numpy as np
import pytest

from proxyclip import fonts
from proxyclip.fonts import bundled_fonts, candidate_fonts, covers, legend_runs
from proxyclip.images import overlay_image

MISSING = "\u0378"  # an unassigned code point: no font has a glyph for it, every font draws its box
CJK = "東京"


def _cjk_font_installed() -> bool:
    return any(covers(f, CJK) for f in candidate_fonts(CJK))


NAMES = [
    "café",
    "Ελλάδα",
    "Москва",
    pytest.param(CJK, marks=pytest.mark.skipif(not _cjk_font_installed(), reason="no CJK font on this system "
                                                "(e.g. apt-get install fonts-noto-cjk or fonts-droid-fallback)")),
]


def _legend(name: str) -> np.ndarray:
    image = np.full((60, 80, 3), 128, np.uint8)
    out = np.asarray(overlay_image(image, np.zeros((60, 80), np.uint8), [name], font_size=24))
    return out[:, 80:]


def test_matplotlib_ships_dejavu_sans():
    (dejavu,) = bundled_fonts()
    assert dejavu.path.endswith("DejaVuSans.ttf") and covers(dejavu, "café Ελλάδα Москва 12.5%")


def _assert_real_glyphs(runs) -> None:
    for font, piece in runs:
        notdef = bytes(font.getmask(MISSING))  # what this font draws for a character it lacks
        for c in piece:
            assert bytes(font.getmask(c)) != notdef, f"{c!r} is drawn as the missing-glyph box"


@pytest.mark.parametrize("name", NAMES)
def test_each_character_gets_a_real_glyph(name):
    runs = legend_runs(name, 24)
    assert "".join(piece for _, piece in runs) == name
    _assert_real_glyphs(runs)


@pytest.mark.parametrize("name", NAMES)
def test_the_legend_draws_the_name_not_boxes(name, monkeypatch):
    # With Pillow's default font, "café" and "caf" + an unassigned character both came out as
    # "caf" and the same box; here the name is drawn and the unassigned character is not.
    monkeypatch.setattr(fonts, "_warned", set())
    boxed = "".join(c if c.isascii() else MISSING for c in name)
    with pytest.warns(UserWarning, match="no font has glyphs"):
        boxes = _legend(boxed)
    assert not np.array_equal(_legend(name), boxes)


def test_a_mixed_name_takes_each_script_from_a_font_that_has_it():
    if not _cjk_font_installed():
        pytest.skip("no CJK font on this system")
    runs = legend_runs(f"{CJK} (Tōkyō)", 24)
    assert "".join(piece for _, piece in runs) == f"{CJK} (Tōkyō)" and len({font.path for font, _ in runs}) == 2
    _assert_real_glyphs(runs)


def test_a_name_no_font_has_warns_naming_the_class(monkeypatch):
    with pytest.warns(UserWarning, match=r"no font has glyphs for '\\u0378' in the class name 'zone\\u0378b'"):
        runs = legend_runs(f"zone{MISSING}b  12.0%", 24, name=f"zone{MISSING}b")
    assert "".join(piece for _, piece in runs) == "zone?b  12.0%"  # drawn as "?", never a box

    monkeypatch.setattr(fonts, "system_fonts", lambda code_points: ())  # a system without a CJK font
    monkeypatch.setattr(fonts, "_warned", set())
    with pytest.warns(UserWarning, match=f"the class name '{CJK}'"):
        runs = legend_runs(CJK, 24, name=CJK)
    assert "".join(piece for _, piece in runs) == "??"


def test_accents_fall_back_to_the_base_letter():
    assert fonts._replacement("é", frozenset(map(ord, "e"))) == "e"
    assert fonts._replacement("東", frozenset(map(ord, "e"))) == "?"
