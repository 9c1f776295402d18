"""``proxyclip segment`` over many images: folders, lists, batches, workers, resuming, sharding, COCO RLE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLIP, tiny_dino
from PIL import Image

from proxyclip.apps.cli import main
from proxyclip.image_stream import InputSpec, count_and_check

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY = ["--clip", TINY_CLIP, "--vfm", "dino_vits16", "--random-weights", "--window", "112", "--stride", "56",
        "--short-side", "64", "--no-progress"]


@pytest.fixture(autouse=True)
def tiny_vfm(monkeypatch):
    from proxyclip.model.vfm import VFM_BUILDERS

    monkeypatch.setitem(VFM_BUILDERS, "dino_vits16", lambda **kwargs: tiny_dino())


def _image(path: Path, seed: int, size=(40, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "in"
    _image(root / "a.jpg", 0)
    _image(root / "sub" / "b.png", 1, (30, 50))
    _image(root / "sub" / "deep" / "c.png", 2, (50, 30))
    _image(root / ".hidden.png", 3)
    (root / "notes.txt").write_text("not an image")
    return root


def _manifest(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"manifest-rank{rank}.jsonl").read_text().splitlines()]


def _outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "manifest" not in p.name)


def test_folders_recursive_resume_and_overwrite(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(tree), "--classes", "a, b, c", "--out", str(out), "--recursive", *TINY]) == 0
    assert _outputs(out) == ["a.png", "a_overlay.png", "sub/b.png", "sub/b_overlay.png", "sub/deep/c.png",
                             "sub/deep/c_overlay.png"]
    lines = _manifest(out)
    assert [(r["input"], r["status"]) for r in lines] == [
        (str(tree / "a.jpg"), "ok"), (str(tree / "sub" / "b.png"), "ok"), (str(tree / "sub" / "deep" / "c.png"), "ok")]
    assert lines[1]["size"] == [50, 30] and lines[1]["outputs"] == ["sub/b.png", "sub/b_overlay.png"]
    assert set(lines[0]["classes"]) <= {"a", "b", "c"} and lines[0]["classes"] and lines[0]["seconds"] >= 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    # started again: every image is complete, nothing is redone
    assert main(["segment", str(tree), "--classes", "a, b, c", "--out", str(out), "-r", *TINY]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    assert [r["status"] for r in _manifest(out)[3:]] == ["skipped"] * 3
    assert "3 skipped" in capsys.readouterr().err
    # an image with an output missing is redone; --overwrite redoes all
    (out / "sub" / "b_overlay.png").unlink()
    assert main(["segment", str(tree), "--classes", "a, b, c", "--out", str(out), "-r", *TINY]) == 0
    assert [r["status"] for r in _manifest(out)[6:]] == ["skipped", "ok", "skipped"]
    assert main(["segment", str(tree), "--classes", "a, b, c", "--out", str(out), "-r", "--overwrite", *TINY]) == 0
    assert [r["status"] for r in _manifest(out)[9:]] == ["ok"] * 3
    # without --recursive only the folder's own images
    assert main(["segment", str(tree), "--classes", "a, b, c", "--out", str(tmp_path / "flat"), *TINY]) == 0
    assert _outputs(tmp_path / "flat") == ["a.png", "a_overlay.png"]


def test_output_folder_inside_the_input_is_not_read_back(tree):
    out = tree / "segmented"
    for _ in range(2):
        assert main(["segment", str(tree), "--classes", "a, b", "--out", str(out), "-r", "--no-overlay", *TINY]) == 0
    assert len(_manifest(out)) == 6  # 3 images, twice: the outputs never became inputs


def test_list_file(tree, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "images.txt").write_text(f"# my images\n../in/a.jpg\n\n{tree / 'sub' / 'b.png'}\n../in/missing.jpg\n")
    out = tmp_path / "out"
    assert main(["segment", "--list", str(lists / "images.txt"), "--classes", "a, b", "--out", str(out),
                 "--no-overlay", *TINY]) == 1  # one listed image is missing
    # outputs keep the path as written (without "..", without the root of absolute paths)
    assert _outputs(out) == ["in/a.png", str(tree / "sub" / "b.png")[1:-4] + ".png"]
    statuses = [(Path(r["input"]).name, r["status"]) for r in _manifest(out)]
    assert statuses == [("a.jpg", "ok"), ("b.png", "ok"), ("missing.jpg", "error")]
    assert "no such file" in _manifest(out)[2]["error"]


def test_batches_and_workers_give_the_same_outputs(tree, tmp_path):
    for extra in (["--batch-images", "1", "--workers", "0"], ["--batch-images", "3", "--workers", "2"]):
        assert main(["segment", str(tree), "-r", "--classes", "a, b, c", "--out", str(tmp_path / extra[1]),
                     "--save-probs", *extra, *TINY]) == 0
    for name in ("a", "sub/b", "sub/deep/c"):
        one = np.asarray(Image.open(tmp_path / "1" / f"{name}.png"))
        three = np.asarray(Image.open(tmp_path / "3" / f"{name}.png"))
        assert np.array_equal(one, three)
        np.testing.assert_allclose(np.load(tmp_path / "1" / f"{name}_probs.npy"),
                                   np.load(tmp_path / "3" / f"{name}_probs.npy"), atol=1e-5)


def test_two_images_with_one_output_name_are_refused(tmp_path, capsys):
    _image(tmp_path / "in" / "x.jpg", 0)
    _image(tmp_path / "in" / "x.png", 1)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "in"), "--classes", "a", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "x.jpg and" in err and "x.png would write the same output names" in err
    assert not out.exists()


def test_json_masks_decode_to_the_label_map(tree, tmp_path):
    from pycocotools import mask as mask_utils

    out = tmp_path / "out"
    assert main(["segment", str(tree / "a.jpg"), "--classes", "cat; kitten, dog, sky, grass", "--out", str(out),
                 "--save-json", "--bg-threshold", "0.3", *TINY]) == 0
    labels = np.asarray(Image.open(out / "a.png"))
    record = json.loads((out / "a.json").read_text())
    assert (record["height"], record["width"]) == labels.shape
    present = np.unique(labels).tolist()
    assert [c["index"] for c in record["classes"]] == present and len(present) > 1
    for c in record["classes"]:
        assert c["name"] == ["cat", "dog", "sky", "grass"][c["index"]]
        assert isinstance(c["rle"]["counts"], str)
        mask = mask_utils.decode({"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()})
        assert np.array_equal(mask.astype(bool), labels == c["index"])  # exactly the label map's pixels
        assert c["area"] == int((labels == c["index"]).sum()) and c["fraction"] == c["area"] / labels.size


def test_inputs_are_streamed_not_held(tmp_path):
    """Counting and checking 200 000 listed images holds a hash per image, not the paths."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"some/long/folder/name/image_{i:07d}.jpg\n" for i in range(200_000)))
    spec = InputSpec(lists=(str(listing),))
    tracemalloc.start()
    try:
        assert count_and_check(spec) == 200_000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20  # the paths alone would take ~16 MiB as Python strings


LAUNCHER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import conftest
from proxyclip.model.vfm import VFM_BUILDERS
VFM_BUILDERS["dino_vits16"] = lambda **kwargs: conftest.tiny_dino()
from proxyclip.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_shares_the_images_out(tmp_path):
    for i in range(5):
        _image(tmp_path / "in" / f"{i}.png", i)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    args = ["segment", str(tmp_path / "in"), "--classes", "a, b", "--no-overlay", "--workers", "1", *TINY]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    for cmd, out in (([sys.executable, str(launcher)], "one"),
                     ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(launcher)], "two")):
        proc = subprocess.run([*cmd, *args, "--out", str(tmp_path / out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one") == [f"{i}.png" for i in range(5)]
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / f"{i}.png")),
                              np.asarray(Image.open(tmp_path / "two" / f"{i}.png")))
    shares = {rank: [Path(r["input"]).stem for r in _manifest(tmp_path / "two", rank)] for rank in (0, 1)}
    assert shares == {0: ["0", "2", "4"], 1: ["1", "3"]}  # image i to process i % 2
