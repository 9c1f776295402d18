"""``proxyclip reproduce``: tables as data, cells shared and resumed, the paper's layout with differences."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import TINY_CLIP, tiny_dino
from test_datasets import make_dataset

import proxyclip.evaluation.runner as runner
from proxyclip.apps.cli import main
from proxyclip.evaluation import grid
from proxyclip.evaluation.presets import PRESETS
from proxyclip.model.methods import METHODS
from proxyclip.model.vfm import VFM_BUILDERS

TINY = ["--clip", TINY_CLIP, "--clip-pretrained", "", "--random-weights", "--window", "112", "--stride", "56",
        "--short-side", "64", "--workers", "0", "--no-progress"]

MINI = {
    "name": "mini",
    "title": "Mini table",
    "source": "made up for the test",
    "columns": [{"key": "voc20", "title": "VOC20", "dataset": "voc20"},
                {"key": "city", "title": "City", "dataset": "cityscapes"}],
    "average": {"key": "avg", "title": "Avg.", "of": ["voc20", "city"]},
    "defaults": {"vfm": "dino_vits16", "method": "proxyclip"},
    "rows": [
        {"label": "Trained", "group": "Training-based", "config": None, "note": "training-based",
         "published": {"voc20": 80.0, "city": 30.5, "avg": 55.25}},
        {"label": "MaskCLIP", "group": "Tiny", "config": {"method": "maskclip"},
         "published": {"voc20": 10.5, "city": None, "avg": None}},
        {"label": "ProxyCLIP", "group": "Tiny", "config": {}, "published": [80.3, 38.1, 59.2]},
        {"label": "ProxyCLIP beta 1.0", "group": "Tiny", "config": {"beta": 1.0}, "published": {"voc20": 1.0}},
        {"label": "No such method", "config": {"method": "nosuch"}, "published": {"voc20": 7.5}},
        {"label": "No such attention", "config": {"attention": "nosuch_attn"}, "published": {}},
        {"label": "No such VFM", "config": {"vfm": "nosuch_vfm"}, "published": {"city": 3.0}},
    ],
}


@pytest.fixture(autouse=True)
def tiny_vfm(monkeypatch):
    monkeypatch.setitem(VFM_BUILDERS, "dino_vits16", lambda **kwargs: tiny_dino())


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("data")
    voc = make_dataset(PRESETS["voc20"], base / "VOC2012", n=2)
    city = make_dataset(PRESETS["cityscapes"], base / "cityscapes", n=2)
    path = base / "roots.txt"
    path.write_text(f"voc20 = {voc.name}\ncityscapes = {city}\n")
    return path


@pytest.fixture
def evaluations(monkeypatch):
    """Every call of the runner's evaluate(), as (dataset, method, settings)."""
    calls = []
    real = runner.evaluate

    def counting(model, data, *args, **kwargs):
        calls.append((data.preset.key, model.config.method, model.config.settings()))
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", counting)
    return calls


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


def results(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]


def find(found: list[dict], dataset: str, method: str, **options) -> dict:
    [hit] = [r for r in found if r["dataset"] == dataset and r["method"] == method
             and all(r["config"][k] == v for k, v in options.items())]
    return hit


def cells(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| Configuration"):
            parts = [p.strip() for p in line.strip("|").split(" | ")]
            rows[parts[0]] = parts[1:]
    return rows


def expected(ours: float, published: float | None) -> str:
    if published is None:
        return f"{ours:.2f} (-)"
    return f"{ours:.2f} ({published:g}, {round(ours - published, 2):+.2f})"


def test_a_small_table_end_to_end_in_the_papers_layout(tmp_path, roots, evaluations, capsys):
    spec = write_spec(tmp_path / "mini.json", MINI)
    out = tmp_path / "out"
    assert main(["reproduce", str(spec), "--roots-file", str(roots), "--out", str(out), *TINY]) == 0
    markdown = (out / "mini.md").read_text()
    assert markdown in capsys.readouterr().out
    lines = markdown.splitlines()
    assert lines[0] == "# Mini table"
    assert "| Configuration | VOC20 | City | Avg. |" in lines  # the paper's columns, the average last
    assert lines.index("| **Training-based** |  |  |  |") < lines.index("| **Tiny** |  |  |  |")
    table = cells(markdown)
    assert list(table) == ["**Training-based**", "Trained", "**Tiny**", "MaskCLIP", "ProxyCLIP", "ProxyCLIP beta 1.0",
                           "No such method", "No such attention", "No such VFM"]
    found = results(out / "runs")
    assert len(found) == 6 and len(evaluations) == 6  # 3 configurations x 2 datasets, each once
    proxy = [find(found, "voc20", "proxyclip", beta=1.2), find(found, "cityscapes", "proxyclip", beta=1.2)]
    ours = [r["metrics"]["mIoU"] for r in proxy]
    avg = round((ours[0] + ours[1]) / 2, 2)
    assert table["ProxyCLIP"] == [expected(ours[0], 80.3), expected(ours[1], 38.1), expected(avg, 59.2)]
    mask = [find(found, d, "maskclip")["metrics"]["mIoU"] for d in ("voc20", "cityscapes")]
    mask_avg = round((mask[0] + mask[1]) / 2, 2)
    assert table["MaskCLIP"] == [expected(mask[0], 10.5), expected(mask[1], None), expected(mask_avg, None)]
    beta = find(found, "voc20", "proxyclip", beta=1.0)["metrics"]["mIoU"]
    assert table["ProxyCLIP beta 1.0"][0] == expected(beta, 1.0)
    # never the published number alone: a cell without ours says why
    assert table["Trained"] == ["not reproduced (published 80)", "not reproduced (published 30.5)",
                                "not reproduced (published 55.25)"]
    assert table["No such method"] == ["not available (published 7.5)", "not available", "not available"]
    assert table["No such attention"] == ["not available"] * 3
    assert table["No such VFM"] == ["not available", "not available (published 3)", "not available"]
    assert "not available: method 'nosuch' is not available in this version (No such method)" in markdown
    assert "nosuch_attn" in markdown and "VFM 'nosuch_vfm' is not available" in markdown
    assert "RANDOM weights" in markdown and f"replaced by {TINY_CLIP}" in markdown
    # the CSV holds the same cells in the same layout; the JSON the numbers
    rows = list(csv.reader(io.StringIO((out / "mini.csv").read_text())))
    assert rows[0] == ["Configuration", "VOC20", "City", "Avg."]
    assert {r[0]: r[1:] for r in rows[1:]}["ProxyCLIP"] == table["ProxyCLIP"]
    record = json.loads((out / "mini.json").read_text())
    cell = record["rows"][2]["cells"]["voc20"]
    assert cell["ours"] == ours[0] and cell["published"] == 80.3 and cell["difference"] == round(ours[0] - 80.3, 2)
    assert cell["result"] == f"voc20-{proxy[0]['config_id']}.json" and (out / "runs" / cell["result"]).exists()
    assert record["rows"][2]["cells"]["avg"]["ours"] == avg


def test_a_rerun_and_other_tables_reuse_every_finished_cell(tmp_path, roots, evaluations):
    spec = write_spec(tmp_path / "mini.json", MINI)
    out = tmp_path / "out"
    args = ["--roots-file", str(roots), "--out", str(out), *TINY]
    assert main(["reproduce", str(spec), *args]) == 0
    assert len(evaluations) == 6
    first = (out / "mini.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    evaluations.clear()
    assert main(["reproduce", str(spec), *args]) == 0
    assert evaluations == [] and (out / "mini.md").read_text() == first
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    # another table holding the same configuration under another label, and a new one
    other = dict(MINI, name="other", rows=[
        {"label": "Ours again", "config": {"method": "proxyclip"}, "published": {}},
        {"label": "Gamma 2", "config": {"gamma": 2.0}, "published": {}},
    ])
    third = dict(other, name="third", rows=other["rows"][1:])  # shares the new row within one invocation
    assert main(["reproduce", str(write_spec(tmp_path / "other.json", other)),
                 str(write_spec(tmp_path / "third.json", third)), *args]) == 0
    assert sorted((d, m, s["gamma"]) for d, m, s in evaluations) == [("cityscapes", "proxyclip", 2.0),
                                                                       ("voc20", "proxyclip", 2.0)]
    ours_again = [c.split(" (")[0] for c in cells((out / "other.md").read_text())["Ours again"]]
    assert ours_again == [c.split(" (")[0] for c in cells(first)["ProxyCLIP"]]
    assert cells((out / "third.md").read_text())["Gamma 2"] == cells((out / "other.md").read_text())["Gamma 2"]
    # --restart evaluates again
    evaluations.clear()
    assert main(["reproduce", str(spec), "--restart", *args]) == 0
    assert len(evaluations) == 6


def test_limit_is_marked_and_kept_apart(tmp_path, roots, evaluations):
    spec = write_spec(tmp_path / "mini.json", dict(MINI, rows=MINI["rows"][2:3]))
    out = tmp_path / "out"
    assert main(["reproduce", str(spec), "--roots-file", str(roots), "--out", str(out), "--limit", "1", *TINY]) == 0
    markdown = (out / "mini.md").read_text()
    row = cells(markdown)["ProxyCLIP"]
    assert all(re.match(r"^-?\d+\.\d\d\* \(", c) for c in row), row
    assert "* only the first 1 images of each dataset (--limit 1)" in markdown
    assert [r["num_images"] for r in results(out / "runs-limit1")] == [1, 1]
    assert not (out / "runs").exists()


def test_dry_run_lists_cells_and_loads_nothing(tmp_path, roots, evaluations, capsys):
    spec = write_spec(tmp_path / "mini.json", MINI)
    assert main(["reproduce", str(spec), "--roots", f"voc20={tmp_path}", "--out", str(tmp_path / "o"),
                 "--dry-run", *TINY]) == 0
    text = capsys.readouterr().out
    assert evaluations == [] and not (tmp_path / "o").exists()
    assert "ProxyCLIP: failed" in text and "voc20 layout" in text  # the root holds no VOC
    assert "not run, no dataset root: City" in text
    assert "No such method: not available (method 'nosuch' is not available in this version)" in text


def test_print_spec_round_trips_and_bad_specs_say_what_to_fix(tmp_path, capsys):
    assert main(["reproduce", "table1", "--print-spec"]) == 0
    text = capsys.readouterr().out
    assert json.loads(text) == json.loads(grid.spec_path("table1").read_text())
    bad = write_spec(tmp_path / "bad.json", dict(MINI, columns=[{"key": "x", "dataset": "nope"}]))
    assert main(["reproduce", str(bad), "--dry-run"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    short = write_spec(tmp_path / "short.json", dict(MINI, rows=[{"label": "a", "config": {}, "published": [1.0]}]))
    assert main(["reproduce", str(short), "--dry-run"]) == 2
    assert "1 published numbers for 3 columns" in capsys.readouterr().err
    assert main(["reproduce", "table99", "--dry-run"]) == 2
    assert "unknown table 'table99'" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in grid.BUILTIN])
def test_shipped_specs_are_valid(name):
    data = grid.load_spec(name)
    if data["kind"] in ("coherence", "similarity"):
        assert data["dataset"] in PRESETS and data["vfms"]
        return
    specs = grid.sweep_specs(data) if data["kind"] == "sweep" else [grid.table_spec(data)]
    known_vfms = set(VFM_BUILDERS) | {"sd15"}
    for spec in specs:
        for row in spec.rows:
            if row.config is None:
                continue
            settings = {**spec.defaults, **row.config}
            assert settings.get("vfm", "dino_vitb8") in known_vfms, row.label
            if settings.get("method", "proxyclip") in METHODS and spec.kind == "miou":
                ctx = grid.GridContext(roots={})
                for column in spec.columns:
                    cell = grid.plan_cell(spec, row, column, ctx)
                    assert cell.status in (grid.NO_ROOT, grid.UNAVAILABLE), (row.label, cell.reason)


def test_the_same_configuration_is_one_run_across_the_shipped_tables(tmp_path):
    """Table 1's ProxyCLIP B/16 + DINO B/8 row is also in Tables 3, 4 and 7 (and 6's Stuff Adaptive)."""
    root = make_dataset(PRESETS["coco_stuff"], tmp_path / "coco", n=1)
    ctx = grid.GridContext(roots={"coco_stuff": root})

    def stuff_key(name: str, label: str, column: str = "coco_stuff") -> str:
        spec = grid.table_spec(grid.load_spec(name))
        index = [r.label for r in spec.rows].index(label)
        [col] = [c for c in spec.columns if c.key == column]
        return grid.plan_cell(spec, spec.rows[index], col, ctx).run.key

    key = stuff_key("table1", "ProxyCLIP")  # the first: ViT-B/16
    assert stuff_key("table3", "DINO B/8") == key and stuff_key("table4", "Norm ✓, Mask ✓") == key
    assert stuff_key("table7", "Proxy") == key and stuff_key("table6", "DINO", "adaptive") == key
    assert stuff_key("table3", "DINO B/16") != key


def test_progress_estimates_the_time_left():
    stream = io.StringIO()
    progress = grid.Progress(total=100, cells=4, every=0.0, stream=stream)
    assert progress.eta() is None
    progress.start -= 10.0  # 10 s for the first 25 images
    progress.update(25, "voc20")
    assert progress.eta() == pytest.approx(30.0, rel=0.05)
    assert "grid 25/100 images (25.0%), ~30s left" in stream.getvalue()
    assert grid.format_duration(3 * 3600 + 120) == "3h02m"


def test_two_gloo_processes_make_the_same_table(tmp_path, roots):
    from test_distributed import LAUNCHER, _run

    spec = write_spec(tmp_path / "mini.json", dict(MINI, rows=MINI["rows"][1:3]))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    args = ["reproduce", str(spec), "--roots-file", str(roots), *[a for a in TINY if a != "--random-weights"],
            "--random-weights"]
    _run([sys.executable, str(launcher), *args, "--out", str(tmp_path / "one")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher), *args,
          "--out", str(tmp_path / "two")], tmp_path)
    one, two = ((tmp_path / d / "mini.md").read_text() for d in ("one", "two"))
    assert one == two and "not run" not in one
    assert len(list((tmp_path / "two" / "runs" / "cells").glob("*.json"))) == 4


def _paper() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    for base in (repo / "shared", repo.parent / "shared", Path("/work/shared")):
        path = base / "paper" / "ProxyCLIP-ECCV2024.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


@pytest.mark.parametrize("name", grid.TABLES)
def test_published_numbers_match_the_paper_text(name):
    """A second transcription: every table line of the paper's text, its numbers in order, against the
    shipped spec's rows (published numbers in column order, the average last)."""
    text = _paper()
    if text is None:
        pytest.skip("the paper's text (shared/paper) is not here")
    number = int(name[-1])
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"Table {number}:"))
    paper_rows = []
    header = next(i for i in range(start + 1, len(lines)) if "\t" in lines[i])
    for line in lines[header + 1:]:
        if not line.strip():
            if paper_rows:
                break
            continue
        if "\t" not in line:
            break  # the table ends
        values = re.findall(r"(?<![\w/.])(-|\d+\.\d+|\d{4})(?=\t|$)", line)
        if values:  # a row (lines without numbers are group headings)
            paper_rows.append([None if v == "-" else float(v) for v in values])
    spec = grid.table_spec(grid.load_spec(name))
    ours = [[row.published[k] for k in spec.keys] for row in spec.rows]
    assert ours == paper_rows


def test_table5_efficiency_through_the_bench(tmp_path, monkeypatch):
    spec = json.loads(grid.spec_path("table5").read_text())
    spec["bench"] = {"window": 56, "queries": 3, "warmup": 0, "iters": 1, "matmul_size": 64}
    spec["defaults"]["vfm"] = "dino_vits16"
    for row in spec["rows"]:
        if row["config"].get("vfm"):
            row["config"]["vfm"] = "dino_vits16"
    path = write_spec(tmp_path / "t5.json", spec)
    out = tmp_path / "out"
    code = main(["reproduce", str(path), "--out", str(out), "--clip", TINY_CLIP, "--clip-pretrained", "",
                 "--random-weights", "--device", "cpu"])
    assert code == 0
    bench = json.loads((out / "table5-bench.json").read_text())["result"]
    by_row = {r["row"]: r for r in bench["rows"]}
    table = cells((out / "table5.md").read_text())
    clip = by_row["clip"]
    assert table["CLIP"] == [expected(round(clip["params_total_m"], 2), 142.7), expected(round(clip["batch1"]["per_s"], 2), 72.5),
                             expected(round(clip["batch1"]["peak_mib"], 2), 3540), expected(round(clip["gmacs"], 2), 41.7)]
    if "gem" not in METHODS:
        assert table["GEM"] == ["not available (published 142.7)", "not available (published 55.9)",
                                "not available (published 3716)", "not available (published 51.5)"]
    proxy = by_row["proxyclip:dino_vits16"]
    assert table["ProxyCLIP (DINO-B/8)"][3] == expected(round(proxy["gmacs"], 2), 253.3)
    # a re-run reuses the measurement
    import proxyclip.apps.bench as bench_module

    def no_bench(ns):
        raise AssertionError("measured again")

    monkeypatch.setattr(bench_module, "run_bench", no_bench)
    assert main(["reproduce", str(path), "--out", str(out), "--clip", TINY_CLIP, "--clip-pretrained", "",
                 "--random-weights", "--device", "cpu"]) == 0
    assert cells((out / "table5.md").read_text()) == table
