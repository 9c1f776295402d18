"""Nothing lost: signals stop a run cleanly, a full disk stops it once, eval results say what produced them,
and no phase runs silently."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP, tiny_dino
from PIL import Image
from test_datasets import make_dataset

from proxyclip.apps.cli import main
from proxyclip.evaluation import runner
from proxyclip.evaluation.presets import PRESETS

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY = ["--clip", TINY_CLIP, "--vfm", "dino_vits16", "--random-weights", "--window", "112", "--stride", "56",
        "--short-side", "64"]


@pytest.fixture(autouse=True)
def tiny_vfm(monkeypatch):
    from proxyclip.model.vfm import VFM_BUILDERS

    monkeypatch.setitem(VFM_BUILDERS, "dino_vits16", lambda **kwargs: tiny_dino())


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    return tmp_path


# ---- signals ------------------------------------------------------------------------------------------

SLOW_WRITER = f"""
import sys, time
sys.path.insert(0, {str(TESTS)!r})
import conftest
from PIL import Image
from proxyclip.model.vfm import VFM_BUILDERS
VFM_BUILDERS["dino_vits16"] = lambda **kwargs: conftest.tiny_dino()
save = Image.Image.save

def slow_save(self, fp, *args, **kwargs):  # stays inside the write of the first output
    save(self, fp, *args, **kwargs)
    print("WRITING", flush=True)
    time.sleep(120)

Image.Image.save = slow_save
from proxyclip.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("name", "code", "workers", "group"), [
    ("SIGTERM", 143, "0", False), ("SIGHUP", 129, "2", True), ("SIGINT", 130, "0", False)])
def test_signal_during_a_write_removes_the_temporary_file(folder, tmp_path, name, code, workers, group):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITER)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), "segment", str(folder), "--classes", "a, b", "--out",
                             str(out), "--workers", workers, "--no-progress", *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
        assert list(out.glob(".*.part")), "the test must stop the run while a file is being written"
        sig = getattr(signal, name)
        if group:  # a terminal closing: the whole process group, loader workers included
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert not list(out.glob(".*.part")) and not list(out.glob("*.png"))
    lines = err.strip().splitlines()
    assert lines[-1] == ("proxyclip: interrupted" if name == "SIGINT" else f"proxyclip: stopped by {name}"), err
    assert "Traceback" not in err


# ---- write errors ---------------------------------------------------------------------------------

def _disk_full_after(monkeypatch, files: int) -> None:
    """Every fsync after the first ``files`` fails as on a full disk."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > files:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_stops_the_run_once_naming_the_file(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _disk_full_after(monkeypatch, 1)
    assert main(["segment", str(folder), "--classes", "a, b", "--out", str(out), "--no-overlay", "--workers", "0",
                 "--no-progress", *TINY]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"proxyclip: error: cannot write b.png in {out}: No space left on device"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "manifest-rank0.jsonl"]  # c was never started
    assert [json.loads(line)["status"] for line in (out / "manifest-rank0.jsonl").read_text().splitlines()] == ["ok"]


def test_full_disk_during_eval_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    root = make_dataset(PRESETS["voc21"], tmp_path / "voc", n=3)
    _disk_full_after(monkeypatch, 0)
    out = tmp_path / "out"
    assert main(["eval", "--dataset", "voc21", "--root", str(root), "--out", str(out), "--save-predictions",
                 "--workers", "0", "--no-progress", *TINY]) == 3
    err = capsys.readouterr().err
    assert f"cannot write 2008_000000.png in {out / 'predictions' / 'voc21'}: No space left on device" in err
    assert "Traceback" not in err


# ---- eval provenance and seeds ------------------------------------------------------------------------

def test_eval_records_what_produced_it_and_random_runs_resume(tmp_path, monkeypatch):
    root = make_dataset(PRESETS["voc21"], tmp_path / "voc", n=6)
    args = ["eval", "--dataset", "voc21", "--root", str(root), "--workers", "0", "--no-progress", "--seed", "3", *TINY]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    [path] = (tmp_path / "whole").glob("voc21-*.json")
    whole = json.loads(path.read_text())
    prov = whole["provenance"]
    assert prov["weights"] == {"random": True, "seed": 3}
    assert prov["device"] == "cpu" and prov["precision"] == "fp32" and prov["versions"]["torch"] == torch.__version__

    # killed after 3 images, started again with the same seed: it resumes, and ends with the same numbers
    scored, real = [], runner.intersect_and_union

    def stop_after_three(*a, **k):
        if len(scored) == 3:
            raise KeyboardInterrupt
        scored.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "intersect_and_union", stop_after_three)
    out = tmp_path / "resumed"
    assert main([*args, "--out", str(out), "--checkpoint-every", "1"]) == 130
    monkeypatch.setattr(runner, "intersect_and_union", lambda *a, **k: (scored.append(1), real(*a, **k))[1])
    assert main([*args, "--out", str(out)]) == 0
    assert len(scored) == 6  # 3 before the stop, 3 after: the first three were not redone
    [path] = out.glob("voc21-*.json")
    resumed = json.loads(path.read_text())
    assert resumed["areas"] == whole["areas"] and resumed["config_id"] == whole["config_id"]
    # another seed: other weights, another configuration
    assert main([*args[:-len(TINY) - 2], "--seed", "4", *TINY, "--out", str(out)]) == 0
    assert len(list(out.glob("voc21-*.json"))) == 2


# ---- progress ----------------------------------------------------------------------------------------

def test_every_long_phase_shows_progress(folder, tmp_path, capsys):
    long_name = " ".join(f"word{i}" for i in range(40))
    assert main(["segment", str(folder), "--classes", f"a, b, {long_name}", "--out", str(tmp_path / "out"),
                 "--workers", "0", *TINY]) == 0
    err = capsys.readouterr().err
    assert "proxyclip: loading CLIP proxyclip-test-tiny (random weights)" in err
    assert "proxyclip: loading VFM dino_vits16 (random weights)" in err
    assert "encoding class names" in err and "3/3" in err
    assert "proxyclip: segmenting 3 images into 3 classes" in err
    bar = [part for part in err.replace("\r", "\n").splitlines() if "img" in part and "3/3" in part]
    assert bar and "<" in bar[-1]  # elapsed<remaining: an ETA
    warning = [line for line in err.splitlines() if "too long for CLIP" in line]
    assert len(warning) == 1 and warning[0].startswith("proxyclip: warning: class name 'word0 word1")


def test_time_to_start_is_reported_per_model(monkeypatch):
    from proxyclip import ProxyCLIP, ProxyCLIPConfig

    lines: list[str] = []
    start = time.perf_counter()
    ProxyCLIP.build(ProxyCLIPConfig(clip=TINY_CLIP, clip_pretrained="", vfm="dino_vits16"), random_weights=True,
                    progress=lines.append)
    assert lines == [f"loading CLIP {TINY_CLIP} (random weights)", "loading VFM dino_vits16 (random weights)"]
    assert time.perf_counter() - start < 60
