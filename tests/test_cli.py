"""``proxyclip segment`` end to end, in-process, on a tiny CLIP and a small real VFM."""

import pickle

import numpy as np
import pytest
from conftest import TINY_CLIP, tiny_clip
from PIL import Image

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.apps.cli import main

TINY = ["--clip", TINY_CLIP, "--vfm", "dino_vits16", "--random-weights", "--window", "112", "--stride", "56",
        "--short-side", "112"]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(folder / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return folder


def test_segment_writes_labels_overlay_and_probs(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(images / "a.jpg"), str(images / "b.png"), "--classes", "cat; kitten, dog, sky",
                 "--out", str(out), "--save-probs", *TINY])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a.png", "a_overlay.png", "a_probs.npy", "b.png", "b_overlay.png", "b_probs.npy", "manifest-rank0.jsonl"]
    labels = np.asarray(Image.open(out / "a.png"))
    assert labels.shape == (60, 80) and labels.max() < 3
    probs = np.load(out / "a_probs.npy")
    assert probs.shape == (3, 60, 80) and np.array_equal(probs.argmax(0), labels)
    b_size = Image.open(out / "b.png").size
    overlay = Image.open(out / "b_overlay.png").size
    assert overlay[1] >= b_size[1] and overlay[0] > b_size[0]  # the image at its size, and a legend beside it
    assert "segmented 2 of 2 images" in capsys.readouterr().err


def test_one_bad_image_does_not_stop_the_others(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(images / "broken.jpg"), str(images / "a.jpg"), str(images / "nope.png"),
                 "--classes", "a, b", "--out", str(out), *TINY])
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "manifest-rank0.jsonl"]
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "nope.png: no such file" in err
    assert "Traceback" not in err


def test_classes_file(images, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("background; sky\nperson\n")
    out = tmp_path / "o"
    assert main(["segment", str(images / "a.jpg"), "--classes-file", str(names), "--out", str(out), "--save-probs",
                 *TINY]) == 0
    assert np.load(out / "a_probs.npy").shape[0] == 2  # two classes, the first with a synonym


@pytest.mark.parametrize("classes", ["", "cat,,dog", "cat, Cat"])
def test_bad_class_lists_exit_2_and_write_nothing(images, tmp_path, capsys, classes):
    out = tmp_path / "out"
    assert main(["segment", str(images / "a.jpg"), "--classes", classes, "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("proxyclip: error:")
    assert not out.exists()


def test_unwritable_output_folder(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["segment", str(images / "a.jpg"), "--classes", "a", "--out", str(blocker / "sub"), *TINY]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_duplicate_output_names(images, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "x" / "a.png")
    assert main(["segment", str(images / "a.jpg"), str(tmp_path / "x" / "a.png"), "--classes", "a",
                 "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "same output names" in capsys.readouterr().err


def test_missing_weights_say_how_to_supply_them(images, tmp_path, capsys):
    code = main(["segment", str(images / "a.jpg"), "--classes", "a, b", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and err[0].startswith("proxyclip: error: 2 weight files missing")  # one message, both named
    assert "CLIP ViT-B-16 (openai)" in err[1] and "--clip-weights FILE" in err[1]
    assert "VFM dino_vitb8" in err[2] and "--vfm-weights FILE" in err[2]
    assert "HF_HUB_OFFLINE=1" in err[3]
    assert not (tmp_path / "o").exists()  # nothing written, not even the folder


def test_fp16_on_cpu_is_refused(images, tmp_path, capsys):
    assert main(["segment", str(images / "a.jpg"), "--classes", "a", "--device", "cpu", "--precision", "fp16",
                 "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


def test_local_clip_weights_are_loaded(images, tmp_path):
    """A local checkpoint replaces the hub: the output equals the model the file came from."""
    import torch
    from safetensors.torch import save_file

    from proxyclip.model.clip import load_clip

    model, _ = tiny_clip(seed=3)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, _ = load_clip(TINY_CLIP, None, weights=str(path))
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # Through the command line (MaskCLIP needs no VFM weights): the file's model segments.
    out = tmp_path / "o"
    assert main(["segment", str(images / "a.jpg"), "--classes", "sky, dog", "--clip", TINY_CLIP, "--clip-weights",
                 str(path), "--method", "maskclip", "--window", "112", "--stride", "56", "--short-side", "112",
                 "--save-probs", "--out", str(out)]) == 0
    config = ProxyCLIPConfig(clip=TINY_CLIP, method="maskclip", window=112, stride=56, short_side=112)
    expected = ProxyCLIP(model, tiny_clip()[1], None, config).segment(images / "a.jpg", ["sky", "dog"], return_probs=True)
    np.testing.assert_allclose(np.load(out / "a_probs.npy"), expected.probs, atol=1e-5)


def test_pickled_code_in_a_checkpoint_is_never_executed(images, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh, protocol=2)
    code = main(["segment", str(images / "a.jpg"), "--classes", "a", "--out", str(tmp_path / "o"),
                 "--clip", TINY_CLIP, "--clip-weights", str(path), "--method", "maskclip"])
    assert code == 2
    assert not marker.exists()
    assert "could not be loaded" in capsys.readouterr().err


def test_vfm_weights_from_a_local_file(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from proxyclip.model.vfm import VFM_BUILDERS

    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
    path = tmp_path / "dino.safetensors"
    save_file(ref.state_dict(), str(path))
    vfm = VFM_BUILDERS["dino_vits16"](weights=str(path))
    torch.testing.assert_close(vfm.model.pos_embed, ref.pos_embed)
    feats = vfm(torch.randn(1, 3, 64, 96))
    assert feats.shape == (1, 384, 4, 6)


def test_missing_vfm_weights():
    from proxyclip.errors import WeightsError
    from proxyclip.model.vfm import VFM_BUILDERS

    with pytest.raises(WeightsError, match="--vfm-weights"):
        VFM_BUILDERS["dino_vits16"]()


@pytest.mark.parametrize("command", [[], ["segment"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: proxyclip" in out
    if command:
        for option in ("--classes", "--clip-weights", "--vfm-weights", "--beta", "--gamma", "--window", "--stride",
                       "--bg-threshold", "--device", "--precision", "--random-weights", "--save-probs"):
            assert option in out


def test_folder_input(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(images), "--classes", "a, b", "--out", str(out), "--no-overlay", *TINY]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]  # broken.jpg reported, others written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", str(empty), "--classes", "a", "--out", str(out), *TINY]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_library_logs_are_hidden_unless_verbose(images, tmp_path, caplog):
    args = ["segment", str(images / "a.jpg"), "--classes", "a", "--out", str(tmp_path / "o"), *TINY]
    caplog.set_level("INFO")
    assert main(args) == 0
    assert "No pretrained weights loaded" not in caplog.text  # open_clip's log line
    assert main(["--verbose", *args]) == 0
    assert "No pretrained weights loaded" in caplog.text


# ---- large images --------------------------------------------------------------------------------

@pytest.fixture
def pixel_limit_restored(monkeypatch):
    from proxyclip.images import MAX_PIXELS_ENV

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv(MAX_PIXELS_ENV, "")  # unset: Pillow's limit; deleted again after the test


def test_max_pixels_raises_the_decompression_bomb_limit(images, tmp_path, capsys, pixel_limit_restored):
    Image.MAX_IMAGE_PIXELS = 3000  # as if a.jpg (80 x 60 = 4800 pixels) were a 12000 x 9000 photo
    out = tmp_path / "out"
    assert main(["segment", str(images / "a.jpg"), "--classes", "a, b", "--out", str(out), *TINY]) == 1
    err = capsys.readouterr().err
    assert "80 x 60 = 4,800 pixels, over the limit of 3,000" in err and "--max-pixels 4800" in err
    assert main(["segment", str(images / "a.jpg"), "--classes", "a, b", "--out", str(out), *TINY,
                 "--max-pixels", "4800"]) == 0
    assert (out / "a.png").exists()


@pytest.mark.parametrize("command", [["eval", "--dataset", "voc21"], ["demo"]])
def test_eval_and_demo_take_max_pixels(command, capsys):
    from proxyclip.apps.cli import make_parser

    assert make_parser().parse_args([*command, "--max-pixels", "200000000"]).max_pixels == 200_000_000
    with pytest.raises(SystemExit):
        make_parser().parse_args([*command, "--max-pixels", "0"])
    assert "0 is not positive" in capsys.readouterr().err


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_a_large_image_needs_a_few_times_its_size_in_memory(tmp_path):
    """Peak memory of ``proxyclip segment`` on a 4000 x 3000 image, over what the process held before."""
    clear_refs = "/proc/self/clear_refs"
    try:
        with open(clear_refs, "w") as fh:
            fh.write("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak")
    height, width = 3000, 4000
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x // 16) % 256, (y // 12) % 256, ((x + y) // 28) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    del y, x, pixels
    small = tmp_path / "small"
    assert main(["segment", str(tmp_path / "big.jpg"), "--classes", "a, b, c", "--out", str(small), *TINY,
                 "--no-overlay"]) == 0  # warm up: imports, caches
    before = _status_kb("VmRSS")
    with open(clear_refs, "w") as fh:
        fh.write("5")
    assert main(["segment", str(tmp_path / "big.jpg"), "--classes", "a, b, c", "--out", str(tmp_path / "o"),
                 *TINY]) == 0
    extra = (_status_kb("VmHWM") - before) * 1024
    image_bytes = height * width * 3
    print(f"peak {extra / 2**20:.0f} MiB over the {before / 1024:.0f} MiB held before, for a {image_bytes / 2**20:.0f} MiB image")
    # the image, its label map (1 byte a pixel), one channel in float32 while resizing, the overlay
    # (Pillow: 4 bytes a pixel): 4-5x measured; full-size float32 and int64 copies took ~16x
    assert extra < 8 * image_bytes, f"peak {extra / 2**20:.0f} MiB over {before / 1024:.0f} MiB for a {image_bytes / 2**20:.0f} MiB image"
