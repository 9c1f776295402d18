"""``torchrun --nproc_per_node=2 ... proxyclip eval`` on the CPU (Gloo) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_datasets import make_dataset

from proxyclip.evaluation.distributed import DistInfo, init_distributed
from proxyclip.evaluation.presets import PRESETS

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# The command line as installed, with the tiny test models: conftest registers the tiny CLIP
# config, and the "dino_vits16" builder gives conftest's tiny DINO; CLIP's random weights come
# from a fixed seed, so every process builds the same model.
LAUNCHER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import torch
import conftest
from proxyclip.model.vfm import VFM_BUILDERS
VFM_BUILDERS["dino_vits16"] = lambda **kwargs: conftest.tiny_dino()
torch.manual_seed(0)
from proxyclip.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_gloo_processes_equal_one(tmp_path):
    root = make_dataset(PRESETS["context59"], tmp_path / "VOC2010", n=5)  # odd: the shards differ in size
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    args = ["eval", "--dataset", "context59", "--root", str(root), "--clip", "proxyclip-test-tiny", "--vfm",
            "dino_vits16", "--random-weights", "--window", "112", "--stride", "56", "--short-side", "64",
            "--workers", "1", "--no-progress"]
    _run([sys.executable, str(launcher), *args, "--out", str(tmp_path / "one")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher), *args,
          "--out", str(tmp_path / "two")], tmp_path)

    [one] = (tmp_path / "one").glob("context59-*.json")
    [two] = (tmp_path / "two").glob("context59-*.json")  # only process 0 writes results
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["areas"] == one["areas"] and two["metrics"] == one["metrics"]
    assert two["config_id"] == one["config_id"] and two["num_images"] == 5
    assert sum(one["areas"]["label"]) > 0
    # every image was scored by exactly one process: 0, 2, 4 by rank 0 and 1, 3 by rank 1
    done = {int(p.name.split("rank")[1][0]): json.loads(p.read_text())["done"]
            for p in (tmp_path / "two" / ".state").glob("*.json")}
    assert done == {0: [0, 2, 4], 1: [1, 3]}


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == DistInfo(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cuda") == DistInfo(0, 1, 0)

