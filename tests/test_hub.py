"""Missing weights: every one named in one error, within seconds, before anything is loaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from proxyclip import ProxyCLIPConfig
from proxyclip.errors import WeightsError
from proxyclip.model import hub

REPO = Path(__file__).resolve().parent.parent


def _fake_cache(root: Path, repo: str, filename: str) -> Path:
    """A Hugging Face cache holding one file of ``repo``, as huggingface_hub lays it out."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snapshot = folder / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(b"weights")
    return snapshot / filename


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_every_missing_weight_in_one_error(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: (False, "test: offline"))
    with pytest.raises(WeightsError) as info:
        hub.check_weights(hub.sources_for(ProxyCLIPConfig()))
    text = str(info.value)
    assert text.startswith("2 weight files missing") and "test: offline" in text
    assert "CLIP ViT-B-16 (openai)" in text and "--clip-weights FILE" in text
    assert "VFM dino_vitb8 (timm vit_base_patch8_224.dino)" in text and "--vfm-weights FILE" in text
    assert "HF_HUB_OFFLINE=1" in text and len(text.splitlines()) == 4
    # a local path that does not exist says so; a method without a VFM needs no VFM weights
    with pytest.raises(WeightsError, match=f"file not found: {tmp_path / 'nope.pt'}") as info:
        hub.check_weights(hub.sources_for(ProxyCLIPConfig(method="maskclip"), clip_weights=str(tmp_path / "nope.pt")))
    assert "VFM" not in str(info.value) and "1 weight file missing" in str(info.value)


def test_cached_weights_load_offline_without_the_network(empty_cache, monkeypatch):
    clip = hub.clip_source("ViT-B-16", "openai")
    vfm = hub.vfm_source("dino_vitb8")
    _fake_cache(empty_cache, clip.repo, "open_clip_model.safetensors")
    path = _fake_cache(empty_cache, vfm.repo, "model.safetensors")
    assert hub.cached_file(vfm) == str(path)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: (False, "test: offline"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.check_weights([clip, vfm]) is True  # nothing missing; the hub is offline
    with hub.weights_available(ProxyCLIPConfig()):
        assert constants.HF_HUB_OFFLINE  # the libraries read the cache without retrying the network
    assert not constants.HF_HUB_OFFLINE
    record = hub.describe_source(vfm)
    assert record == {"kind": "hub", "name": vfm.name, "repo": "timm/vit_base_patch8_224.dino",
                      "file": "model.safetensors", "revision": "0123456789abcdef0123456789abcdef01234567"}


def test_reachable_hub_lets_the_libraries_download(empty_cache, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: (True, ""))
    assert hub.check_weights(hub.sources_for(ProxyCLIPConfig())) is False


def test_probe_gives_up_fast(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    start = time.perf_counter()
    ok, why = hub.hub_reachable()
    assert not ok and f"127.0.0.1:{port} cannot be reached" in why
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_reachable() == (False, "HF_HUB_OFFLINE is set")


def test_cli_offline_fails_in_seconds_naming_both_weights(tmp_path):
    """The command line as a new user runs it: no HF_HUB_OFFLINE, a hub that cannot be reached.
    Before this check, huggingface_hub retried with back-off for ~50 s and named only CLIP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    from PIL import Image

    Image.new("RGB", (32, 24)).save(tmp_path / "a.png")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "proxyclip", "segment", str(tmp_path / "a.png"), "--classes", "a, b",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "CLIP ViT-B-16" in proc.stderr and "VFM dino_vitb8" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert seconds < 25, f"{seconds:.1f} s to the first error"  # imports take a few s; the old retries took 50
