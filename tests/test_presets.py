"""Presets against the protocol of REPRODUCTION.md: class counts, names, thresholds, sizes, labels."""

from __future__ import annotations

import json

import pytest

from proxyclip.apps.cli import main
from proxyclip.classes import read_class_file
from proxyclip.errors import ProxyCLIPError
from proxyclip.evaluation.presets import (
    PRESETS,
    TABLE1_LARGE,
    TABLE1_MAIN,
    DatasetPreset,
    get_preset,
    load_preset,
    preset_to_json,
)

# REPRODUCTION.md, "Datasets" and "Pre-processing" / "Sliding window" / "Text side": key -> (classes,
# threshold, short side, window, stride, reduce_zero_label)
PROTOCOL = {
    "voc21": (21, 0.2, 336, 336, 112, False),
    "voc20": (20, 0.0, 336, 336, 112, True),
    "context60": (60, 0.15, 336, 336, 112, False),
    "context59": (59, 0.0, 336, 336, 112, True),
    "coco_object": (81, 0.25, 336, 336, 112, False),
    "coco_stuff": (171, 0.0, 336, 336, 112, False),
    "cityscapes": (19, 0.0, 448, 224, 112, False),
    "ade20k": (150, 0.0, 448, 336, 112, True),
    "ade847": (847, 0.0, 448, 336, 112, False),
    "context459": (459, 0.0, 448, 336, 112, False),
}
VOC_BACKGROUND = ("sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, "
                  "door, window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence").split(", ")
COCO_BACKGROUND = ("sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, floor, "
                   "hill, rail").split(", ")


@pytest.mark.parametrize("key", list(PROTOCOL))
def test_preset_matches_protocol(key):
    p = PRESETS[key]
    classes, threshold, short, window, stride, reduce = PROTOCOL[key]
    assert (p.num_classes, p.setting("bg_threshold"), p.setting("short_side"), p.setting("window"), p.setting("stride"),
            p.reduce_zero_label) == (classes, threshold, short, window, stride, reduce)
    assert p.setting("long_side") == 2048
    assert len(p.class_list()) == classes
    assert p.ignore(published=True) == 255  # every published run ignored 255


def test_table1_layout_covers_all_presets_once():
    assert TABLE1_MAIN == ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
    assert sorted((*TABLE1_MAIN, *TABLE1_LARGE)) == sorted(PRESETS)


def test_class_names_of_the_published_runs():
    voc21 = PRESETS["voc21"].class_list().names
    assert list(voc21[0]) == VOC_BACKGROUND
    assert voc21[4] == ("ship",) and voc21[11] == ("table",)  # boat, diningtable
    assert PRESETS["voc20"].class_list().names == voc21[1:]
    coco = PRESETS["coco_object"].class_list().names
    assert list(coco[0]) == COCO_BACKGROUND and coco[1] == ("person",) and coco[80] == ("toothbrush",)
    assert coco[60] == ("bed",)  # also a background word, as in the published file
    context60 = PRESETS["context60"].class_list().names
    assert context60[0] == ("background",) and context60[1:] == PRESETS["context59"].class_list().names
    assert PRESETS["ade847"].class_list().names[1] == ("building, edifice",)  # commas stay inside one query
    assert PRESETS["cityscapes"].class_list().names[6] == ("trafficlight",)


def test_ignore_values():
    for key in ("ade847", "context459"):
        p = PRESETS[key]
        assert p.label_dtype == "uint16" and p.label_suffix == ".tif"
        assert p.ignore() == 65535 and p.ignore(published=True) == 255
    assert PRESETS["voc21"].ignore(published=True) == 255


def test_json_round_trip_and_user_presets(tmp_path):
    for p in PRESETS.values():
        path = tmp_path / f"{p.key}.json"
        path.write_text(preset_to_json(p))
        assert load_preset(path) == p
    (tmp_path / "mine.txt").write_text("sky\ncat; kitten\n")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"key": "mine", "classes_file": "mine.txt", "num_classes": 2,
                                "image_dir": "img", "label_dir": "lab", "settings": {"bg_threshold": 0.3}}))
    mine = load_preset(path)
    assert mine.title == "mine" and mine.setting("short_side") == 336 and mine.setting("bg_threshold") == 0.3 and mine.class_list().names == (("sky",), ("cat", "kitten"))


def test_bad_presets(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"key": "x", "classes_file": "voc21.txt", "num_classes": 21, "image_dir": "a", "label_dir": "b", '
                    '"colour": 1}')
    with pytest.raises(ProxyCLIPError, match="unknown field.*colour"):
        load_preset(path)
    path.write_text('{"key": "x"}')
    with pytest.raises(ProxyCLIPError, match="missing field.*classes_file"):
        load_preset(path)
    path.write_text("{not json")
    with pytest.raises(ProxyCLIPError, match="not valid JSON"):
        load_preset(path)
    wrong = DatasetPreset("x", "x", "voc21.txt", 20, "a", "b")
    with pytest.raises(ProxyCLIPError, match="names 21 classes but num_classes is 20"):
        wrong.class_list()
    with pytest.raises(ProxyCLIPError, match="label_dtype"):
        DatasetPreset("x", "x", "voc21.txt", 21, "a", "b", label_dtype="int8")
    with pytest.raises(ProxyCLIPError, match="unknown dataset 'voc'"):
        get_preset("voc")
    assert get_preset("COCO-Object").key == "coco_object"


def test_protocol_class_files_allow_repeats_but_not_empty_names(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("sky; bed\n\nbed\n")
    assert read_class_file(path, unique=False).names == (("sky", "bed"), ("bed",))
    with pytest.raises(ProxyCLIPError, match="given twice"):
        read_class_file(path)
    path.write_text("sky;; bed\n")
    with pytest.raises(ProxyCLIPError, match="empty name"):
        read_class_file(path, unique=False)


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in PRESETS) and "65535 (published 255)" in out
    assert main(["presets", "cityscapes"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["window"] == 224
    assert main(["presets", "voc20", "--classes"]) == 0
    assert capsys.readouterr().out.splitlines()[3] == "ship"
    assert main(["presets", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
