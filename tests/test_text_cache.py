"""Text embeddings on disk: the second run of a vocabulary reads them instead of encoding again."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model

from proxyclip import text_cache
from proxyclip.model import clip as clip_lib

NAMES = ["cat", "dog", "sky", "grass", "a very small red bicycle"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYCLIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "text"


@pytest.fixture
def encodings(monkeypatch):
    """Counts the names that really go through CLIP's text tower."""
    calls = []
    original = clip_lib.encode_queries

    def counting(model, tokenizer, queries, device, batch=8, progress=None, extra_templates=()):
        calls.append(tuple(queries))
        return original(model, tokenizer, queries, device, batch=batch, progress=progress,
                        extra_templates=extra_templates)

    monkeypatch.setattr(clip_lib, "encode_queries", counting)
    return calls


def test_second_model_reads_the_embeddings_from_disk(cache, encodings):
    first = tiny_model().encode_classes(NAMES)
    assert len(encodings) == 1
    [path] = cache.glob("*.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    second = tiny_model().encode_classes(NAMES)  # a new process would see the same: nothing in memory
    assert len(encodings) == 1
    assert torch.equal(first, second)
    assert not list(cache.glob("*.part"))


def test_key_follows_weights_names_templates_and_device(cache, encodings):
    model = tiny_model()
    model.encode_classes(NAMES)
    tiny_model().encode_classes(NAMES[:-1])  # other names
    assert len(encodings) == 2
    other = tiny_model()
    with torch.no_grad():
        other.clip_model.text_projection.add_(1e-3)  # other weights, same architecture
    other.encode_classes(NAMES)
    assert len(encodings) == 3
    templates = [lambda c: f"a photo of {c}."]
    key = text_cache.cache_key(model.clip_model, model.tokenizer, NAMES, templates, "cpu")
    assert key != text_cache.cache_key(model.clip_model, model.tokenizer, NAMES, templates, "cuda")
    assert key != text_cache.cache_key(model.clip_model, model.tokenizer, NAMES, [lambda c: f"{c}"], "cpu")
    assert key == text_cache.cache_key(tiny_model().clip_model, model.tokenizer, NAMES, templates, "cpu")
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_corrupt_files_are_ignored_and_rewritten(cache, encodings):
    expected = tiny_model().encode_classes(NAMES)
    [path] = cache.glob("*.safetensors")
    data = path.read_bytes()
    assert torch.equal(text_cache.load(path, NAMES), expected)
    for broken in (data[: len(data) // 2], b"", b"\x00" * 100):
        path.write_bytes(broken)
        assert torch.equal(tiny_model().encode_classes(NAMES), expected)
        assert torch.equal(text_cache.load(path, NAMES), expected)  # written again, whole
    assert len(encodings) == 4


def test_off_switches_and_size_bound(cache, encodings, monkeypatch, tmp_path):
    with text_cache.disabled():
        tiny_model().encode_classes(NAMES)
    assert not cache.exists()
    monkeypatch.setenv("PROXYCLIP_CACHE", "off")
    tiny_model().encode_classes(NAMES)
    assert not cache.exists() and len(encodings) == 2
    monkeypatch.setenv("PROXYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROXYCLIP_CACHE_MAX_MB", "0.0005")  # ~500 bytes: room for one small vocabulary
    for n in range(3):
        tiny_model().encode_classes([f"thing {n}"])
    assert len(list(cache.glob("*.safetensors"))) == 1  # the oldest evicted, the newest kept


def test_unwritable_cache_warns_once_and_still_encodes(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PROXYCLIP_CACHE", str(blocker))
    monkeypatch.setattr(text_cache, "_warned_unwritable", False)
    with pytest.warns(UserWarning, match="not cached"):
        emb = tiny_model().encode_classes(NAMES)
    assert emb.shape[0] == len(NAMES)


def test_encoding_reports_progress():
    model = tiny_model()
    seen = []
    clip_lib.encode_queries(model.clip_model, model.tokenizer, [f"n{i}" for i in range(19)], "cpu", batch=8,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen == [(8, 19), (16, 19), (19, 19)]


def test_names_longer_than_the_context_are_named_in_a_warning(cache):
    long_name = " ".join(f"word{i}" for i in range(40))  # ~80 tokens before any template
    near = " ".join(["cat"] * 70)  # fits alone, not once a template is around it
    model = tiny_model()
    with pytest.warns(UserWarning) as record:
        model.encode_classes(["sky", long_name, near])
    messages = [str(w.message) for w in record if "too long for CLIP" in str(w.message)]
    assert len(messages) == 2 and "word0 word1" in messages[0] and "cat cat" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model().encode_classes(["sky", "a " * 50 + "cat"])  # 52 tokens + template: fits, no warning
    with pytest.warns(UserWarning, match="word0"):  # read from the disk cache: still said
        tiny_model().encode_classes(["sky", long_name, near])


def test_command_line_uses_the_cache_unless_told_not_to(cache, tmp_path, monkeypatch):
    from conftest import TINY_CLIP
    from PIL import Image

    from proxyclip.apps.cli import main
    from proxyclip.model.vfm import VFM_BUILDERS

    monkeypatch.setitem(VFM_BUILDERS, "dino_vits16", lambda **kwargs: __import__("conftest").tiny_dino())
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    args = ["segment", str(tmp_path / "a.png"), "--classes", "cat, dog", "--clip", TINY_CLIP, "--vfm", "dino_vits16",
            "--random-weights", "--window", "112", "--stride", "56", "--workers", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "o1"), "--no-text-cache"]) == 0
    assert not cache.exists()
    assert main([*args, "--out", str(tmp_path / "o2")]) == 0
    assert len(list(cache.glob("*.safetensors"))) == 1
