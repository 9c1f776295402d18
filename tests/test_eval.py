"""Evaluation end to end on synthetic datasets with tiny models: pipeline, resume, outputs, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP, tiny_dino, tiny_model
from PIL import Image
from test_datasets import make_dataset

from proxyclip.apps.cli import main
from proxyclip.evaluation.datasets import DatasetError, SegmentationDataset
from proxyclip.evaluation.metrics import intersect_and_union, summarize
from proxyclip.evaluation.presets import PRESETS
from proxyclip.evaluation.report import collect_results, table1
from proxyclip.evaluation.runner import RunOptions, evaluate, preset_config

FAST = {"window": 112, "stride": 56, "short_side": 64}  # resizing still happens (40 x 60 -> 64 x 96)
CLI_TINY = ["--clip", TINY_CLIP, "--vfm", "dino_vits16", "--random-weights", "--window", "112", "--stride", "56",
            "--short-side", "64", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> SegmentationDataset:
    root = make_dataset(PRESETS["voc21"], tmp_path_factory.mktemp("voc"), n=6)
    return SegmentationDataset(PRESETS["voc21"], root)


@pytest.fixture(scope="module")
def reference(voc):
    """An uninterrupted single-process run."""
    return evaluate(preset_config(tiny_model(), voc.preset, FAST), voc)


def test_evaluation_is_segment_then_metric(voc, reference):
    """Per image exactly what ProxyCLIP.segment does, scored at the original size."""
    model = preset_config(tiny_model(), voc.preset, FAST)
    assert model.config.bg_threshold == 0.2 and model.config.short_side == 64
    areas = torch.zeros(3, 21, dtype=torch.int64)
    for s in voc.samples:
        labels = model.segment(s.image, voc.classes).labels
        areas += intersect_and_union(torch.from_numpy(labels), torch.from_numpy(voc.read_label(s.label)), 21, 255)
    assert reference["areas"] == dict(zip(("intersect", "pred", "label"), areas.tolist()))
    assert reference["metrics"] == summarize(areas, voc.preset.display_names(voc.classes))
    assert reference["metrics"]["per_class"][0]["class"] == "background"
    assert reference["num_images"] == 6 and reference["complete"]
    assert areas[2].sum() > 0 and areas[0].sum() > 0  # the test is not vacuous


def test_preset_long_side_reaches_the_model_unless_overridden(voc):
    preset = replace(voc.preset, settings={**voc.preset.settings, "long_side": 500})
    assert preset_config(tiny_model(), preset, FAST).config.long_side == 500
    assert preset_config(tiny_model(), preset, {**FAST, "long_side": 700}).config.long_side == 700


def test_background_workers_and_row_bands_give_the_same_numbers(voc, reference):
    result = evaluate(preset_config(tiny_model(), voc.preset, FAST), voc, RunOptions(workers=2))
    assert result["areas"] == reference["areas"]
    model = preset_config(tiny_model(), voc.preset, FAST)
    model.band_elements = 21 * 26 * 60 * 3  # resize and classify a few rows at a time
    assert evaluate(model, voc)["areas"] == reference["areas"]


def test_windows_of_several_images_batched_give_the_same_numbers(voc, reference):
    model = preset_config(tiny_model(), voc.preset, FAST).with_config(window_batch=5)
    assert evaluate(model, voc, RunOptions(batch_images=4))["areas"] == reference["areas"]


def _killed_run(root: str, out: str, kill_after: int) -> None:
    """Evaluate in a fresh process and SIGKILL it (no clean-up at all) after ``kill_after`` images."""
    data = SegmentationDataset(PRESETS["voc21"], root)

    def kill(count: int) -> None:
        if count == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    evaluate(preset_config(tiny_model(), data.preset, FAST), data, RunOptions(out_dir=out, checkpoint_every=2), on_image=kill)


def test_resume_after_a_kill_gives_identical_numbers(voc, reference, tmp_path):
    out = tmp_path / "out"
    proc = multiprocessing.get_context("spawn").Process(target=_killed_run, args=(str(voc.root), str(out), 3))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    [state] = (out / ".state").glob("voc21-*-rank0of1.json")
    assert len(json.loads(state.read_text())["done"]) == 2  # the checkpoint before the kill
    assert not list(out.glob("voc21-*.json"))  # no result yet, and never a partial one
    seen = []
    result = evaluate(preset_config(tiny_model(), voc.preset, FAST), voc, RunOptions(out_dir=out, checkpoint_every=2), on_image=seen.append)
    assert len(seen) == 4  # only the images not saved before
    assert result["areas"] == reference["areas"] and result["metrics"] == reference["metrics"]
    [written] = out.glob("voc21-*.json")
    assert json.loads(written.read_text())["areas"] == reference["areas"]
    again = []
    evaluate(preset_config(tiny_model(), voc.preset, FAST), voc, RunOptions(out_dir=out), on_image=again.append)
    assert again == []  # a finished run is not redone


def test_stop_saves_progress_and_other_settings_do_not_mix(voc, reference, tmp_path):
    def stop(count: int) -> None:
        if count == 3:
            raise KeyboardInterrupt

    model = preset_config(tiny_model(), voc.preset, FAST)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, voc, RunOptions(out_dir=tmp_path, checkpoint_every=100), on_image=stop)
    [state] = (tmp_path / ".state").glob("*.json")
    assert len(json.loads(state.read_text())["done"]) == 3  # saved on the way out
    seen = []
    other = model.with_config(bg_threshold=0.5)
    evaluate(other, voc, RunOptions(out_dir=tmp_path), on_image=seen.append)
    assert len(seen) == 6 and len(list((tmp_path / ".state").glob("*.json"))) == 2
    seen.clear()
    result = evaluate(model, voc, RunOptions(out_dir=tmp_path), on_image=seen.append)
    assert len(seen) == 3 and result["areas"] == reference["areas"]
    seen.clear()
    evaluate(model, voc, RunOptions(out_dir=tmp_path, resume=False), on_image=seen.append)
    assert len(seen) == 6


def test_limit_predictions_and_overlays(voc, tmp_path):
    model = preset_config(tiny_model(), voc.preset, FAST)
    result = evaluate(model, voc, RunOptions(out_dir=tmp_path, limit=2, save_predictions=True, save_overlays=True))
    assert result["num_images"] == 2 and not result["complete"]
    preds = sorted((tmp_path / "predictions" / "voc21").iterdir())
    assert [p.stem for p in preds] == [s.id for s in voc.samples[:2]]
    first = voc.samples[0]
    labels = np.asarray(Image.open(preds[0]))
    assert labels.shape == voc.read_label(first.label).shape
    assert np.array_equal(labels, model.segment(first.image, voc.classes).labels)
    assert len(list((tmp_path / "overlays" / "voc21").iterdir())) == 2
    assert "(partial: --limit)" in next(tmp_path.glob("voc21-*.md")).read_text()
    assert not list(tmp_path.rglob("*.part"))


def test_unreadable_image_and_size_mismatch(tmp_path):
    preset = PRESETS["ade20k"]
    root = make_dataset(preset, tmp_path / "ade", n=3)
    data = SegmentationDataset(preset, root)
    data.samples[1].image.write_bytes(b"\xff\xd8\xff not a jpeg")
    model = preset_config(tiny_model(), preset, FAST)
    with pytest.raises(DatasetError, match=r"2008_000001.jpg: cannot read the image"):
        evaluate(model, data, RunOptions(out_dir=tmp_path / "out"))
    assert len(json.loads(next((tmp_path / "out" / ".state").glob("*.json")).read_text())["done"]) == 1
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(data.samples[1].image)
    with pytest.raises(DatasetError, match=r"label size .* differs from image"):
        evaluate(model, data, RunOptions(out_dir=tmp_path / "out"))


def test_ade847_correct_and_published_ignore(tmp_path):
    preset = PRESETS["ade847"]
    root = make_dataset(preset, tmp_path, n=2)
    correct, published = (SegmentationDataset(preset, root, published_ignore=q) for q in (False, True))
    labels = np.concatenate([correct.read_label(s.label).ravel() for s in correct.samples])
    pixels, void, c255 = labels.size, int((labels == 65535).sum()), int((labels == 255).sum())
    assert void > 0 and c255 > 0
    model = preset_config(tiny_model(), preset, FAST)
    # This test is about the ignore values, not the text side: skip encoding 847 x 80 prompts.
    queries = correct.classes.queries
    model._text_cache[queries] = torch.nn.functional.normalize(torch.randn(len(queries), 32), dim=-1)
    a, b = evaluate(model, correct), evaluate(model, published)
    assert (a["ignore_index"], b["ignore_index"]) == (65535, 255) and b["published_ignore"]
    assert sum(a["areas"]["label"]) == pixels - void and sum(a["areas"]["pred"]) == pixels - void
    assert sum(b["areas"]["label"]) == pixels - void - c255  # void is out of range: no label area ...
    assert sum(b["areas"]["pred"]) == pixels - c255  # ... but its predictions count
    assert a["config_id"] != b["config_id"] and "published ignore" in b["config_label"]


def test_table1_layout():
    def record(key, miou, cid="a", complete=True):
        return {"config_id": cid, "config_label": f"config {cid}", "dataset": key, "complete": complete,
                "metrics": {"mIoU": miou}}

    main8 = ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k"]
    results = [record(k, 10.0 * (i + 1)) for i, k in enumerate(main8)] + [record("ade847", 5.55)]
    results += [record("voc21", 61.3, "b", complete=False), record("custom", 1.0, "c")]
    markdown, rows = table1(results)
    lines = markdown.splitlines()
    assert lines[0] == ("| Configuration | VOC21 | Context60 | Object | VOC20 | Context59 | Stuff | City | ADE | Avg | "
                        "ADE847 | Context459 |")
    assert lines[2] == ("| config a | 10.00 | 20.00 | 30.00 | 40.00 | 50.00 | 60.00 | 70.00 | 80.00 | 45.00 | 5.55 | - |")
    assert lines[3].startswith("| config b | 61.30* | - |") and "| - | - | - |" in lines[3]
    assert rows[0]["avg"] == 45.0 and rows[1]["avg"] is None and len(rows) == 2


# ---- the command ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def tiny_vfm(monkeypatch):
    """The command's "dino_vits16" builds the tiny DINO of conftest (the CLI path stays the same)."""
    from proxyclip.model.vfm import VFM_BUILDERS

    monkeypatch.setitem(VFM_BUILDERS, "dino_vits16", lambda **kwargs: tiny_dino())


def test_eval_command_one_dataset(voc, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--dataset", "voc21", "--root", str(voc.root), "--out", str(out), *CLI_TINY]) == 0
    [path] = out.glob("voc21-*.json")
    result = json.loads(path.read_text())
    assert result["num_images"] == 6 and result["config"]["bg_threshold"] == 0.2 and result["config"]["window"] == 112
    assert result["overrides"] == {"window": 112, "stride": 56, "short_side": 64}
    assert len(result["metrics"]["per_class"]) == 21
    assert f"voc21: mIoU {result['metrics']['mIoU']:.2f}" in capsys.readouterr().err


def test_eval_command_several_datasets_gives_table1(tmp_path, capsys):
    voc = make_dataset(PRESETS["voc20"], tmp_path / "VOC2012", n=2)
    city = make_dataset(PRESETS["cityscapes"], tmp_path / "cityscapes", n=2)
    roots = tmp_path / "roots.txt"
    roots.write_text(f"# dataset roots\nvoc20 = {voc.name}\ncityscapes = {city}\n")
    out = tmp_path / "out"
    assert main(["eval", "--dataset", "all", "--roots-file", str(roots), "--out", str(out), *CLI_TINY]) == 0
    table = (out / "table1.md").read_text()
    assert table.splitlines()[2].startswith(f"| {TINY_CLIP} (openai) ProxyCLIP + dino_vits16 [")
    assert table in capsys.readouterr().out
    city_result = json.loads(next(out.glob("cityscapes-*.json")).read_text())
    assert city_result["config"]["short_side"] == 64 and city_result["num_images"] == 2
    assert main(["eval", "--dataset", "voc20", "--roots", f"voc20={voc}", "--out", str(out), "--beta", "1.0",
                 *CLI_TINY]) == 0
    assert main(["eval", "--dataset", "voc20", "--roots", f"voc20={voc}", "--out", str(out), "--attention", "norm",
                 *CLI_TINY]) == 0
    labels = sorted(row["label"] for row in table1(collect_results(out))[1])
    assert len(labels) == 3 and len(set(labels)) == 3  # every ablation row tells which it is
    assert any("beta 1.0" in label for label in labels) and any("attention norm" in label for label in labels)


def test_eval_command_custom_dataset_and_preset_file(tmp_path):
    root = make_dataset(PRESETS["voc20"], tmp_path / "voc", n=2)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"class {i}; thing {i}" for i in range(21)) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--dataset", "custom", "--images", str(root / "JPEGImages"),
                 "--labels", str(root / "SegmentationClass"), "--classes-file", str(classes),
                 "--out", str(out), *CLI_TINY]) == 0
    custom = json.loads(next(out.glob("custom-*.json")).read_text())
    assert custom["num_images"] == 2 and len(custom["metrics"]["per_class"]) == 21
    assert custom["metrics"]["per_class"][20]["class"] == "class 20"
    preset = dict(json.loads(json.dumps(PRESETS["voc20"].__dict__)), key="mine", settings={"bg_threshold": 0.1})
    preset_file = tmp_path / "mine.json"
    preset_file.write_text(json.dumps(preset))
    assert main(["eval", "--dataset", str(preset_file), "--root", str(root), "--out", str(out), *CLI_TINY]) == 0
    mine = json.loads(next(out.glob("mine-*.json")).read_text())
    assert mine["config"]["bg_threshold"] == 0.1 and len(mine["metrics"]["per_class"]) == 20


def test_eval_command_errors(voc, tmp_path, capsys):
    def run(*args):
        code = main(["eval", *args, "--out", str(tmp_path / "out"), *CLI_TINY])
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = run("--dataset", "voc21", "--root", str(tmp_path))
    assert code == 2 and len(err) == 1
    assert "JPEGImages: no such folder; expected the voc21 layout: ROOT/JPEGImages/ID.jpg" in err[0]
    code, err = run("--dataset", "voc21")
    assert code == 2 and "no root given for voc21" in err[0]
    code, err = run("--dataset", "all")
    assert code == 2 and "needs dataset roots" in err[0]
    code, err = run("--dataset", "custom", "--images", str(tmp_path))
    assert code == 2 and "needs --labels, --classes-file" in err[0]
    code, err = run("--dataset", "voc21,ade20k", "--root", str(voc.root))
    assert code == 2 and "--root names one dataset" in err[0]
    code, err = run("--dataset", "voc21", "--root", str(voc.root), "--limit", "0")
    assert code == 2 and "--limit must be at least 1" in err[0]
    code, err = run("--dataset", "voc21", "--roots", "voc21")
    assert code == 2 and "KEY=PATH" in err[0]
