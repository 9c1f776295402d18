"""The demo's logic and its Gradio handlers, on tiny random models, without a browser."""

import base64
import sys
import threading
import time

import numpy as np
import pytest
from conftest import TINY_CLIP, tiny_clip, tiny_dino, tiny_model
from PIL import Image

from proxyclip.apps import demo
from proxyclip.apps.cli import main, make_parser
from proxyclip.apps.demo import (
    CUSTOM,
    EXAMPLES,
    EXAMPLES_DIR,
    VOCABULARIES,
    DemoApp,
    DemoInputError,
    DemoLimits,
    ModelStore,
    Settings,
    format_classes,
    parse_class_text,
    payload_path,
    read_upload,
    vocabulary,
)
from proxyclip.errors import ClassNamesError, ImageError, ProxyCLIPError
from proxyclip.model.methods import METHODS

HOUSE = EXAMPLES_DIR / "house.jpg"


@pytest.fixture
def app(tmp_path):
    return DemoApp(ModelStore(tiny_model()), DemoLimits(work_side=160), out_dir=tmp_path / "out")


def settings(app, **changes):
    return Settings(**{**vars(app.defaults), **changes})


# ---- inputs ------------------------------------------------------------------------------------

def test_examples_are_small_images_with_valid_classes():
    for name, text in EXAMPLES:
        path = EXAMPLES_DIR / name
        assert path.stat().st_size < 100_000
        with Image.open(path) as img:
            assert img.size == (640, 480)
        assert len(parse_class_text(text)) >= 5


def test_class_text_takes_commas_new_lines_and_synonyms():
    classes = parse_class_text("cat; kitten, dog\n\nsky,\n grass ")
    assert classes.names == (("cat", "kitten"), ("dog",), ("sky",), ("grass",))
    with pytest.raises(ClassNamesError, match="name at least one class"):
        parse_class_text(" \n ")
    with pytest.raises(ClassNamesError, match="name at least one class"):
        parse_class_text(" , ;")
    with pytest.raises(ClassNamesError, match="given twice"):
        parse_class_text("cat, dog, Cat")


@pytest.mark.parametrize("label", list(VOCABULARIES))
def test_every_vocabulary_loads_within_the_limits(label):
    classes, names, threshold = vocabulary(label)
    assert len(names) == len(classes) <= DemoLimits().max_classes
    assert len(set(names)) == len(names)
    assert str(len(classes)) in label
    if len({q.lower() for q in classes.queries}) == len(classes.queries):  # COCO-Object repeats "bed"
        assert parse_class_text(format_classes(classes)).names == classes.names
    assert 0.0 <= threshold < 1.0


def test_vocabulary_with_background_threshold_shows_background():
    classes, names, threshold = vocabulary("PASCAL VOC (21 classes)")
    assert threshold == pytest.approx(0.2)
    assert names[0] == "background" and names[1] == "aeroplane" and len(classes.names[0]) > 1
    with pytest.raises(DemoInputError, match="unknown vocabulary"):
        vocabulary("VOC")


def test_class_limits(app):
    too_many = ", ".join(f"class {i}" for i in range(app.limits.max_classes + 1))
    with pytest.raises(DemoInputError, match=f"at most {app.limits.max_classes} classes"):
        app.resolve_classes(CUSTOM, too_many)
    with pytest.raises(DemoInputError, match="characters"):
        app.resolve_classes(CUSTOM, "x" * (app.limits.max_text + 1))
    small = DemoApp(app.store, DemoLimits(max_classes=5, max_names=4), out_dir=app.out_dir)
    with pytest.raises(DemoInputError, match="5 names given"):
        small.resolve_classes(None, "a; b; c, d, e")
    with pytest.raises(DemoInputError, match="21 classes given"):
        small.resolve_classes("PASCAL VOC (21 classes)", "ignored")


def test_read_upload_refuses_non_images_big_files_and_huge_images(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(ImageError, match="not an image"):
        read_upload(text, DemoLimits())
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(HOUSE.read_bytes()[:5000])
    with pytest.raises(ImageError, match="the uploaded file") as exc:
        read_upload(truncated, DemoLimits())
    assert str(tmp_path) not in str(exc.value)
    with pytest.raises(ImageError, match="has 0.0 MB; the limit is 0.01 MB"):
        read_upload(HOUSE, DemoLimits(max_upload_mb=0.01))
    wide = tmp_path / "wide.png"
    Image.new("RGB", (5000, 8)).save(wide)
    with pytest.raises(ImageError, match="5000 x 8 px; the limit is 4096 px a side"):
        read_upload(wide, DemoLimits())
    with pytest.raises(ImageError, match="gone"):
        read_upload(tmp_path / "missing.png", DemoLimits())


def test_read_upload_downscales_to_the_work_size(tmp_path):
    pixels, size = read_upload(HOUSE, DemoLimits(work_side=320))
    assert size == (640, 480) and pixels.shape == (240, 320, 3) and pixels.dtype == np.uint8
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(rgba)
    pixels, size = read_upload(rgba, DemoLimits())
    assert size == (30, 20) and pixels.shape == (20, 30, 3) and (pixels == 255).all()  # alpha on white


def test_payload_path_accepts_gradio_files_and_data_urls(tmp_path):
    assert payload_path(None, tmp_path) == (None, None)
    assert payload_path({"path": "/x/y.png", "orig_name": "photo.png"}, tmp_path) == ("/x/y.png", "photo.png")
    url = "data:image/jpeg;base64," + base64.b64encode(HOUSE.read_bytes()).decode()
    path, name = payload_path({"path": None, "url": url}, tmp_path)
    assert read_upload(path, DemoLimits())[1] == (640, 480) and name == "image"
    with pytest.raises(ImageError, match="no image"):
        payload_path({"path": None, "url": None}, tmp_path)


# ---- models and requests -----------------------------------------------------------------------

def test_model_store_loads_each_model_once_on_first_use():
    calls = {"clip": 0, "vfm": 0}

    def load_clip():
        calls["clip"] += 1
        return tiny_clip(seed=5)

    def load_vfm():
        calls["vfm"] += 1
        return tiny_dino(seed=6)

    base = tiny_model()
    store = ModelStore(base, {"other-clip": ("openai", load_clip)}, {"dino_vits8": load_vfm})
    assert store.clip_names == [TINY_CLIP, "other-clip"] and store.vfm_names == ["dino_vitb8", "dino_vits8"]
    assert store.get(TINY_CLIP, "dino_vitb8") is base and calls == {"clip": 0, "vfm": 0}
    assert not store.is_loaded("other-clip", "dino_vits8")
    pair = store.get("other-clip", "dino_vits8")
    assert store.get("other-clip", "dino_vits8") is pair and store.is_loaded("other-clip", "dino_vits8")
    mixed = store.get(TINY_CLIP, "dino_vits8")
    assert calls == {"clip": 1, "vfm": 1}
    assert mixed.clip_model is base.clip_model and mixed.vfm is pair.vfm and mixed.config.vfm == "dino_vits8"
    assert pair.config.clip == "other-clip" and pair.config.clip_pretrained == "openai"
    base.encode_classes(["sky", "grass"])  # text embeddings are shared by the pairs of one CLIP
    assert mixed.is_encoded(["sky", "grass"]) and not pair.is_encoded(["sky", "grass"])
    with pytest.raises(DemoInputError, match="unknown VFM 'sam_vitb'"):
        store.get(TINY_CLIP, "sam_vitb")
    with pytest.raises(ProxyCLIPError, match="method 'proxyclip'"):
        ModelStore(tiny_model(method="maskclip"))


def test_run_segments_writes_files_and_reports_time(app):
    out = app.run(HOUSE, CUSTOM, "sky, grass; lawn, house", settings(app), image_name="my photo.jpg")
    assert out.pixels.shape == (120, 160, 3) and out.labels.shape == (120, 160)
    assert out.names == ("sky", "grass", "house") and out.labels.max() < 3
    assert [p.name for p in out.files] == ["my_photo_labels.png", "my_photo_overlay.png"]
    saved = Image.open(out.files[0])
    assert saved.mode == "P" and np.array_equal(np.asarray(saved), out.labels)
    assert Image.open(out.files[1]).height == 120
    assert "Segmented in" in out.summary and "160 x 120 px (downscaled from 640 x 480)" in out.summary
    assert "Encoding the class names took" in out.summary and out.seconds > 0
    masks = out.annotations()
    assert {name for _, name in masks} == {out.names[c] for c in np.unique(out.labels)}
    assert sum(m for m, _ in masks).max() == pytest.approx(demo.MASK_OPACITY)  # one class per pixel
    palette = np.asarray(saved.getpalette()[: 3 * len(out.names)]).reshape(-1, 3)  # the label PNG's colours
    assert out.color_map() == {name: "#{:02x}{:02x}{:02x}".format(*rgb) for name, rgb in zip(out.names, palette)}
    assert out.comparison == []
    again = app.run(HOUSE, CUSTOM, "sky, grass; lawn, house", settings(app))
    assert "Encoding the class names" not in again.summary  # cached
    assert np.array_equal(again.labels, out.labels)


def test_run_applies_the_settings(app):
    base = app.run(HOUSE, CUSTOM, "sky, grass, house", settings(app))
    other = app.run(HOUSE, CUSTOM, "sky, grass, house", settings(app, options={"beta": 0.2, "gamma": 8.0}))
    assert not np.array_equal(base.labels, other.labels)
    everything_bg = app.run(HOUSE, CUSTOM, "sky, grass, house", settings(app, bg_threshold=1.0))
    assert (everything_bg.labels == 0).all()
    with pytest.raises(ProxyCLIPError, match="stride 224 is larger than the window 112"):
        app.run(HOUSE, CUSTOM, "sky, grass", settings(app, window=112, stride=224))
    with pytest.raises(DemoInputError, match="unknown method"):
        app.run(HOUSE, CUSTOM, "sky, grass", settings(app, method="no-such-method"))
    with pytest.raises(DemoInputError, match="unknown CLIP"):
        app.run(HOUSE, CUSTOM, "sky, grass", settings(app, clip="ViT-G-14"))
    with pytest.raises(ImageError, match="no image"):
        app.run(None, CUSTOM, "sky, grass", settings(app))


def test_compare_runs_three_methods_side_by_side(app):
    out = app.run(HOUSE, CUSTOM, "sky, grass, house", settings(app, compare=True, method="maskclip"))
    captions = [caption for _, caption in out.comparison]
    assert [c.split(" - ")[0] for c in captions] == [METHODS[m].title for m in ("clip", "maskclip", "proxyclip")] + [
        spec.title for name, spec in METHODS.items() if name not in ("clip", "maskclip", "proxyclip")]
    assert all(img.width == 160 and img.height > 120 for img, _ in out.comparison)  # the legend below the image
    alone = app.run(HOUSE, CUSTOM, "sky, grass, house", settings(app, method="maskclip"))
    assert np.array_equal(alone.labels, out.labels) and "with MaskCLIP" in out.summary


def test_requests_never_run_the_model_twice_at_once(app, monkeypatch):
    from proxyclip.model.segmenter import ProxyCLIP

    active, peak = [0], [0]
    segment = ProxyCLIP.segment

    def slow_segment(self, *args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return segment(self, *args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(ProxyCLIP, "segment", slow_segment)
    errors = []

    def request():
        try:
            app.run(HOUSE, CUSTOM, "sky, grass", settings(app))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and peak[0] == 1


def test_old_result_folders_are_removed(tmp_path):
    app = DemoApp(ModelStore(tiny_model()), DemoLimits(work_side=64), out_dir=tmp_path, keep=2)
    for _ in range(4):
        out = app.run(HOUSE, CUSTOM, "sky, grass", settings(app))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003", "000004"]
    assert all(p.exists() for p in out.files)


# ---- the Gradio layer --------------------------------------------------------------------------

def _handler(blocks, api_name):
    return next(f.fn for f in blocks.fns.values() if f.api_name == api_name)


def _segment_handler(app):
    """The page's Segment handler, called as Gradio calls it: the progress tracker first."""
    on_segment = _handler(demo.build_ui(app), "segment")

    def call(*inputs, progress=lambda *args, **kwargs: None):
        return on_segment(progress, *inputs)

    return call


def test_page_handler_returns_outputs_and_turns_errors_into_messages(app, tmp_path):
    gr = pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")
    on_segment = _segment_handler(app)
    d = app.defaults
    knobs = [d.clip, d.vfm, "proxyclip", d.bg_threshold, d.window, d.stride]
    upload = {"path": str(HOUSE), "orig_name": "house.jpg"}
    annotated, status, files, gallery, has_result = on_segment(upload, CUSTOM, "sky, grass, house", *knobs, True, False)
    base, masks = annotated.value["image"], annotated.value["annotations"]
    assert Image.open(base["path"]).size == (160, 120)
    assert {m["label"] for m in masks} <= {"sky", "grass", "house"} and masks
    assert set(annotated.color_map) == {"sky", "grass", "house"}
    assert status.value.startswith("**Segmented in") and "pc-error" not in (status.elem_classes or [])
    assert [f.rsplit("/", 1)[1] for f in files] == ["house_labels.png", "house_overlay.png"]
    assert gallery.visible is True and len(gallery.value) == len(demo.method_titles()) and has_result is True

    url = "data:image/jpeg;base64," + base64.b64encode(HOUSE.read_bytes()).decode()
    annotated, status, files, gallery, _ = on_segment({"path": None, "url": url}, CUSTOM, "sky", *knobs, False, True)
    assert "640 x 480" in status.value and gallery.visible is False and files[0].endswith("image_labels.png")
    assert not list(app.out_dir.glob("upload-*"))  # the decoded upload is removed again

    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    cases = [
        ({"path": str(bad)}, CUSTOM, "sky", knobs, "not an image"),
        (upload, CUSTOM, "  ", knobs, "name at least one class"),
        (upload, CUSTOM, "sky, sky", knobs, "given twice"),
        (None, CUSTOM, "sky", knobs, "no image"),
        (upload, CUSTOM, "sky", [*knobs[:4], 112, 224], "stride 224 is larger"),
        (upload, CUSTOM, "sky", [*knobs[:3], "many", *knobs[4:]], "bad setting"),
    ]
    for had_result in (True, False):
        for image, vocab, text, settings_, message in cases:
            annotated, status, files, gallery, has = on_segment(image, vocab, text, *settings_, False, had_result)
            # the previous outputs stay as they are; the status line says why, and says the result is the old one
            assert annotated == gr.skip() and files == gr.skip() and gallery == gr.skip() and has is had_result
            assert status.value.startswith("**Not segmented:** ") and message in status.value
            assert "pc-error" in status.elem_classes and "Traceback" not in status.value
            assert ("earlier request" in status.value) is had_result


def test_page_handler_reports_progress(app):
    pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")
    on_segment = _segment_handler(app)
    seen = []

    def progress(fraction, desc=None, **kwargs):
        seen.append((fraction, desc))

    d = app.defaults
    on_segment({"path": str(HOUSE)}, "PASCAL VOC (21 classes)", None, d.clip, d.vfm, "proxyclip", 0.0, 112, 56, True,
               False, progress=progress)
    queries = len(vocabulary("PASCAL VOC (21 classes)")[0].queries)
    encoding = [(f, what) for f, what in seen if what.startswith("encoding the class names")]
    assert [what.split(":")[1].split("(")[0].strip() for _, what in encoding] == [
        f"{done} of {queries}" for done in [0, *range(8, queries, 8), queries]]
    assert encoding[-1][0] == 1.0
    assert [what for _, what in seen if what.startswith("segmenting")] == [
        f"segmenting with {title}" for title in demo.method_titles().values()]
    seen.clear()
    on_segment({"path": str(HOUSE)}, "PASCAL VOC (21 classes)", None, d.clip, d.vfm, "proxyclip", 0.0, 112, 56, False,
               True, progress=progress)
    assert not [what for _, what in seen if what.startswith("encoding")]  # cached: nothing to wait for


def test_page_handler_hides_internal_errors_behind_one_line(app, monkeypatch):
    pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")
    on_segment = _segment_handler(app)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nat some deep place")

    monkeypatch.setattr(app, "run", broken)
    d = app.defaults
    status = on_segment({"path": str(HOUSE)}, CUSTOM, "sky", d.clip, d.vfm, "proxyclip", 0.0, 112, 56, False, False,
                        1.2, 3.0)[1]
    assert "segmentation failed (RuntimeError: out of memory); the server log" in status.value
    assert "deep place" not in status.value


def test_page_lists_the_limits_and_the_vocabularies(app):
    pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")
    config = demo.build_ui(app).get_config_file()
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "files up to 20 MB" in texts and "4096 px a side" in texts and "up to 200 classes" in texts
    choices = next(c["props"]["choices"] for c in config["components"] if c["props"].get("elem_id") == "pc-vocab")
    assert [c[0] for c in choices] == [CUSTOM, *VOCABULARIES]


# ---- the sub-command ---------------------------------------------------------------------------

TINY = ["--clip", TINY_CLIP, "--vfm", "dino_vits16", "--random-weights", "--window", "112", "--stride", "56",
        "--short-side", "112"]


def test_demo_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["demo", *TINY]) == 2
    err = capsys.readouterr().err
    assert err == "proxyclip: error: install the web extra: pip install 'proxyclip[web]'\n"


def test_make_app_loads_the_default_models_and_offers_the_added_ones():
    args = make_parser().parse_args(["demo", *TINY, "--add-vfm", "dino_vits8", "--add-vfm", "dino_vits16",
                                     "--max-classes", "7", "--work-side", "96", "--method", "maskclip"])
    app = demo.make_app(args)
    assert app.store.vfm_names == ["dino_vits16", "dino_vits8"] and app.store.clip_names == [TINY_CLIP]
    assert app.limits.max_classes == 7 and app.limits.work_side == 96 and app.default_method == "maskclip"
    assert app.random_weights and not app.store.is_loaded(TINY_CLIP, "dino_vits8")
    out = app.run(HOUSE, CUSTOM, "sky, grass", settings(app, vfm="dino_vits8", window=112, stride=56))
    assert out.labels.shape == (72, 96) and app.store.is_loaded(TINY_CLIP, "dino_vits8")
    assert "Loading" in out.summary and "RANDOM WEIGHTS" in out.summary


def test_demo_options_are_checked(capsys):
    parser = make_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--add-vfm", "dino_vitx"])
    assert "unknown VFM 'dino_vitx'" in capsys.readouterr().err
    args = parser.parse_args(["demo", *TINY, "--max-side", "0"])
    with pytest.raises(ProxyCLIPError, match="must be positive"):
        demo.make_app(args)
    assert parser.parse_args(["demo", "--add-clip", "ViT-L-14:openai=/w.bin"]).add_clip == [
        ("ViT-L-14", "openai", "/w.bin")]
