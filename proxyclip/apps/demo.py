"""``proxyclip demo``: a browser demo (Gradio) -- upload an image, name the classes, see the segmentation.

Two layers, so the logic is testable without a browser or even without Gradio:

- :class:`DemoApp` does the work: it checks the inputs against :class:`DemoLimits`, picks the
  models from a :class:`ModelStore` (each CLIP and VFM is loaded once, on first use, and kept),
  segments under a lock (one request at a time), and returns a :class:`DemoResult`. Bad input
  raises a :class:`~proxyclip.errors.ProxyCLIPError` whose message is meant for the page.
- :func:`build_ui` lays out the Gradio page and turns those errors into ``gr.Error`` messages;
  :func:`run_demo` is the CLI sub-command. Gradio is imported only there (the ``web`` extra).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..classes import ClassList, parse_classes
from ..errors import ClassNamesError, ImageError, ProxyCLIPError
from ..model.methods import get_method

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent.parent / "data"
EXAMPLES_DIR = DATA_DIR / "examples"
WEB_EXTRA_HINT = "install the web extra: pip install 'proxyclip[web]'"

# Vocabularies offered in the page: label -> dataset preset key (proxyclip.presets), whose class-names
# file (proxyclip/data/classnames/KEY.txt) and background threshold are used.
VOCABULARIES = {
    "PASCAL VOC (21 classes)": "voc21",
    "COCO-Object (81 classes)": "coco_object",
    "COCO-Stuff (171 classes)": "coco_stuff",
    "ADE20K (150 classes)": "ade20k",
    "Cityscapes (19 classes)": "cityscapes",
}
CUSTOM = "Custom"

PAGE_METHODS_FIRST = ("clip", "maskclip", "proxyclip")  # the baselines, then the method, then the registry's others
MASK_OPACITY = 0.6  # of the class colours over the image in the page

# (image file in data/examples, classes) shown under the inputs.
EXAMPLES = (
    ("house.jpg", "sky, cloud, sun, grass, house; building, roof, tree, door, window, path"),
    ("beach.jpg", "sky, sea; ocean, sand; beach, sun, boat; sailboat, umbrella, towel"),
)


@dataclass(frozen=True)
class DemoLimits:
    """What one request may ask for; shown in the page."""

    max_upload_mb: float = 20.0  # upload size (Gradio refuses larger files; checked again here)
    max_side: int = 4096  # images with a longer side are refused
    work_side: int = 1024  # images with a longer side are downscaled to it first; outputs have that size
    max_classes: int = 200  # classes per request (the largest preset, COCO-Stuff, has 171)
    max_names: int = 1000  # names per request, synonyms included
    max_text: int = 20000  # characters in the classes box

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def describe(self) -> str:
        """One line for the page."""
        return (f"files up to {self.max_upload_mb:g} MB; images up to {self.max_side} px a side (larger ones are "
                f"refused, ones over {self.work_side} px are downscaled to {self.work_side} px); "
                f"up to {self.max_classes} classes")


class DemoInputError(ProxyCLIPError):
    """A request the demo cannot serve (limits, unknown choices); the message is for the page."""


# ---- inputs ----------------------------------------------------------------------------------

@functools.cache
def vocabulary(label: str) -> tuple[ClassList, tuple[str, ...], float]:
    """A preset vocabulary: its classes, their display names and the preset's background threshold.

    Classes whose first name is a bag of background words (VOC, COCO-Object: class 0 with a
    background threshold) are shown as "background".
    """
    from ..evaluation.presets import get_preset

    if label not in VOCABULARIES:
        raise DemoInputError(f"unknown vocabulary {label!r}; choose one of {', '.join(VOCABULARIES)}")
    preset = get_preset(VOCABULARIES[label])
    classes = preset.class_list()
    return classes, preset.display_names(classes), preset.setting("bg_threshold")


def format_classes(classes: ClassList) -> str:
    """One class a line, synonyms separated by "; " (what :func:`parse_class_text` reads back)."""
    return "\n".join("; ".join(names) for names in classes.names)


def parse_class_text(text: str) -> ClassList:
    """Classes separated by commas or new lines, synonyms of one class by semicolons."""
    if not re.sub(r"[\s,;]", "", text or ""):
        raise ClassNamesError("name at least one class, e.g. 'sky, grass, house; building', or pick a vocabulary")
    lines = [line.strip().strip(",") for line in text.splitlines()]
    return parse_classes(", ".join(line for line in lines if line))


def read_upload(path: str | os.PathLike, limits: DemoLimits) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an uploaded image within the limits.

    Returns:
        H x W x 3 uint8 RGB pixels, downscaled so the long side is at most ``limits.work_side``,
        and the original (width, height).

    Raises:
        ImageError: the file is too big, not an image, or has too many pixels.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageError("the uploaded file is gone; upload it again") from None
    if size > limits.max_upload_bytes:
        raise ImageError(f"the file has {size / 2**20:.1f} MB; the limit is {limits.max_upload_mb:g} MB")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise ImageError(f"the image has too many pixels; the limit is {limits.max_side} px a side") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageError("the file is not an image (or not a format Pillow reads); upload a JPEG, PNG or WebP") from None
    if max(width, height) > limits.max_side:
        raise ImageError(f"the image is {width} x {height} px; the limit is {limits.max_side} px a side: "
                         "downscale it first")
    from ..images import load_image

    try:
        pixels = load_image(path)
    except ImageError as exc:
        raise ImageError(str(exc).replace(str(path), "the uploaded file")) from None
    h, w = pixels.shape[:2]
    if max(h, w) > limits.work_side:
        scale = limits.work_side / max(h, w)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = np.asarray(Image.fromarray(pixels).resize(new, Image.Resampling.LANCZOS))
    return pixels, (width, height)


def method_titles() -> dict[str, str]:
    """The methods of the registry, name -> title, in the page's order."""
    from ..model.methods import METHODS

    names = [n for n in PAGE_METHODS_FIRST if n in METHODS] + [n for n in METHODS if n not in PAGE_METHODS_FIRST]
    return {name: METHODS[name].title for name in names}


def method_options() -> dict[str, dict]:
    """Every method option of the registry, name -> {default, help, choices, methods}, for the page's
    controls (an option shared by several methods is one control)."""
    from dataclasses import fields

    from ..model.methods import METHODS

    options: dict[str, dict] = {}
    for name in method_titles():
        spec = METHODS[name]
        for f in fields(spec.options):
            entry = options.setdefault(f.name, {"default": f.default, "help": f.metadata.get("help", ""),
                                                "choices": f.metadata.get("choices"), "methods": []})
            entry["methods"].append(name)
    return options


# ---- models ----------------------------------------------------------------------------------

class ModelStore:
    """The CLIPs and VFMs a demo offers; each is loaded once, on first use, and kept.

    Args:
        base: a built ProxyCLIP (method "proxyclip"): its CLIP and VFM are the defaults, its
            config, device and dtype are used for every other pair.
        clip_loaders: more CLIPs, name -> (pretrained tag, function returning (model, tokenizer)).
        vfm_loaders: more VFMs, name -> function returning the VFM module.
    """

    def __init__(self, base, clip_loaders: dict[str, tuple[str, Callable[[], tuple]]] | None = None,
                 vfm_loaders: dict[str, Callable[[], object]] | None = None):
        if base.vfm is None:
            raise ProxyCLIPError("the demo's model must be built with a VFM (method 'proxyclip'): some methods use it")
        cfg = base.config
        self.base = base
        self._clip_loaders = {cfg.clip: (cfg.clip_pretrained, None), **(clip_loaders or {})}
        self._vfm_loaders = {cfg.vfm: None, **(vfm_loaders or {})}
        self._clips = {cfg.clip: (base.clip_model, base.tokenizer)}
        self._vfms = {cfg.vfm: base.vfm}
        self._pairs = {(cfg.clip, cfg.vfm): base}
        self._text_caches = {cfg.clip: base._text_cache}  # one per CLIP: text does not depend on the VFM

    @property
    def clip_names(self) -> list[str]:
        return list(self._clip_loaders)

    @property
    def vfm_names(self) -> list[str]:
        return list(self._vfm_loaders)

    def is_loaded(self, clip: str, vfm: str) -> bool:
        return (clip, vfm) in self._pairs

    def get(self, clip: str, vfm: str):
        """The ProxyCLIP of this CLIP and VFM, loading either on first use (not thread-safe: lock around it)."""
        from ..model.segmenter import ProxyCLIP

        if clip not in self._clip_loaders:
            raise DemoInputError(f"unknown CLIP {clip!r}; this demo offers {', '.join(self._clip_loaders)}")
        if vfm not in self._vfm_loaders:
            raise DemoInputError(f"unknown VFM {vfm!r}; this demo offers {', '.join(self._vfm_loaders)}")
        if (clip, vfm) not in self._pairs:
            base = self.base
            if clip not in self._clips:
                self._clips[clip] = self._clip_loaders[clip][1]()
            if vfm not in self._vfms:
                self._vfms[vfm] = self._vfm_loaders[vfm]()
            clip_model, tokenizer = self._clips[clip]
            config = replace(base.config, clip=clip, clip_pretrained=self._clip_loaders[clip][0], vfm=vfm)
            model = ProxyCLIP(clip_model.to(base.dtype), tokenizer, self._vfms[vfm].to(base.dtype), config,
                              self._text_caches.setdefault(clip, OrderedDict()))
            self._pairs[(clip, vfm)] = model.to(base.device)
        return self._pairs[(clip, vfm)]


# ---- the work --------------------------------------------------------------------------------

def comparison_font_size(width: int) -> int:
    """Legend text height (px) of the side-by-side overlays of an image ``width`` px wide: they are
    shown at about a third of the result's width, so 1/18 of the width stays above 11 px there."""
    return max(12, round(width / 18))


@dataclass(frozen=True)
class Settings:
    """What the page sends besides the image and the classes."""

    clip: str
    vfm: str
    method: str
    bg_threshold: float
    window: int
    stride: int
    compare: bool = False  # run every method and show them side by side
    options: Mapping[str, Any] = field(default_factory=dict)  # method options by name, for the methods that take them


@dataclass
class DemoResult:
    pixels: np.ndarray  # H x W x 3 uint8: the image as segmented (downscaled to the work size)
    labels: np.ndarray  # H x W class indices (uint8 up to 256 classes)
    names: tuple[str, ...]  # display name of each class, in label order
    seconds: float  # time the segmentation took (the chosen method only)
    summary: str  # Markdown for the page: time, sizes, classes present
    files: list[Path]  # label PNG and overlay PNG, to download
    comparison: list[tuple[Image.Image, str]] = field(default_factory=list)  # (overlay, caption) per method

    def annotations(self) -> list[tuple[np.ndarray, str]]:
        """(H x W float mask: MASK_OPACITY inside the class, 0 elsewhere; name) of each class present, largest first."""
        from ..images import classes_by_area

        opacity = np.float32(MASK_OPACITY)  # float32: 4 bytes a pixel a class present, not 8
        return [((self.labels == c) * opacity, self.names[c]) for c, _ in classes_by_area(self.labels)]

    def color_map(self) -> dict[str, str]:
        """Class name -> "#rrggbb", the label PNG's palette colours."""
        from ..images import palette

        colours = palette(len(self.names))
        return {name: "#{:02x}{:02x}{:02x}".format(*colours[c]) for c, name in enumerate(self.names)}


class DemoApp:
    """Serves segmentation requests: checks them, runs the model, writes the files.

    Args:
        store: the models.
        limits: what one request may ask for.
        out_dir: where result files go (the newest ``keep`` requests' files are kept).
        random_weights: the models have random weights (the page says so).
        default_method: the method the page starts with.
    """

    def __init__(self, store: ModelStore, limits: DemoLimits | None = None, out_dir: str | Path | None = None,
                 random_weights: bool = False, default_method: str = "proxyclip", keep: int = 32):
        if default_method not in method_titles():
            raise DemoInputError(f"unknown method {default_method!r}; choose one of {', '.join(method_titles())}")
        self.store = store
        self.limits = limits or DemoLimits()
        self.random_weights = random_weights
        self.default_method = default_method
        self._owned_dir = None if out_dir else tempfile.TemporaryDirectory(prefix="proxyclip-demo-")
        self.out_dir = Path(out_dir) if out_dir else Path(self._owned_dir.name)
        self.keep = keep
        self._lock = threading.Lock()
        self._count = 0

    @property
    def defaults(self) -> Settings:
        cfg = self.store.base.config
        return Settings(clip=cfg.clip, vfm=cfg.vfm, method=self.default_method, bg_threshold=cfg.bg_threshold,
                        window=cfg.window,
                        stride=cfg.stride, options={k: v["default"] for k, v in method_options().items()})

    def resolve_classes(self, preset: str | None, text: str | None) -> tuple[ClassList, tuple[str, ...]]:
        """The classes of a request: a preset vocabulary, or the text box when ``preset`` is CUSTOM/None."""
        if preset and preset != CUSTOM:
            classes, names, _ = vocabulary(preset)
        else:
            text = text or ""
            if len(text) > self.limits.max_text:
                raise DemoInputError(f"the class list has {len(text)} characters; the limit is {self.limits.max_text}")
            classes = parse_class_text(text)
            names = classes.display_names
        if len(classes) > self.limits.max_classes:
            raise DemoInputError(f"{len(classes)} classes given; this demo segments at most "
                                 f"{self.limits.max_classes} classes at once")
        if len(classes.queries) > self.limits.max_names:
            raise DemoInputError(f"{len(classes.queries)} names given (synonyms included); the limit is "
                                 f"{self.limits.max_names}")
        return classes, names

    def run(self, image_path: str | os.PathLike | None, preset: str | None, text: str | None,
            settings: Settings, image_name: str | None = None,
            progress: Callable[[float | None, str], None] | None = None) -> DemoResult:
        """Segment one uploaded image; raises ProxyCLIPError with a message for the page.

        ``progress(fraction or None, what)`` is told each phase: waiting for the model, loading a
        model on first use, encoding the class names (with a count: 80 prompts a name, minutes for a
        large vocabulary on a CPU), segmenting with each method.
        """
        say = progress or (lambda fraction, what: None)
        titles = method_titles()
        if settings.method not in titles:
            raise DemoInputError(f"unknown method {settings.method!r}; choose one of {', '.join(titles)}")
        classes, names = self.resolve_classes(preset, text)
        if image_path is None:
            raise ImageError("no image: upload one, paste one, take one with the webcam, or click an example")
        pixels, (width, height) = read_upload(image_path, self.limits)
        say(None, "waiting for the model (one request at a time)")
        with self._lock:
            loaded = self.store.is_loaded(settings.clip, settings.vfm)
            if not loaded:
                say(None, f"loading {settings.clip} + {settings.vfm} (first use)")
            start = time.perf_counter()
            pair = self.store.get(settings.clip, settings.vfm)
            load_seconds = time.perf_counter() - start
            encoded = pair.is_encoded(classes)
            start = time.perf_counter()

            def encoding(done: int, total: int) -> None:
                say(done / total, f"encoding the class names: {done} of {total} (80 prompts each; cached afterwards)")

            if not encoded:
                encoding(0, len(classes.queries))
            pair.encode_classes(classes, progress=encoding)  # cached per CLIP and class list
            text_seconds = None if encoded else time.perf_counter() - start
            methods = tuple(titles) if settings.compare else (settings.method,)
            runs = {}
            for i, method in enumerate(methods):
                say(i / len(methods), f"segmenting with {titles[method]}")
                options = {k: v for k, v in settings.options.items() if k in get_method(method).option_names()}
                model = pair.with_config(method=method, bg_threshold=settings.bg_threshold,
                                         window=int(settings.window), stride=int(settings.stride), **options)
                start = time.perf_counter()
                result = model.segment(pixels, classes, return_probs=False)  # labels only: less memory
                runs[method] = (result.labels, time.perf_counter() - start)
        return self._finish(pixels, (width, height), names, runs, settings, image_name,
                            None if loaded else load_seconds, text_seconds)

    def _finish(self, pixels, original_size, names, runs, settings, image_name, load_seconds,
                text_seconds) -> DemoResult:
        from ..images import classes_by_area, label_image, overlay_image, write_atomically

        labels, seconds = runs[settings.method]
        overlay = overlay_image(pixels, labels, names)
        comparison = []
        if settings.compare:  # shown a third of the result's width: the legend below, in large type
            titles = method_titles()
            font_size = comparison_font_size(pixels.shape[1])
            for method, (m_labels, m_seconds) in runs.items():
                comparison.append((overlay_image(pixels, m_labels, names, legend="below", font_size=font_size),
                                   f"{titles[method]} - {m_seconds:.2f} s"))
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(image_name or "image").stem).strip("_")[:40] or "image"
        folder = self._new_folder()
        files = [folder / f"{stem}_labels.png", folder / f"{stem}_overlay.png"]
        write_atomically({files[0]: label_image(labels, len(names)), files[1]: overlay})

        present = classes_by_area(labels)
        shares = ", ".join(f"{names[c]} " + (f"{100 * share:.0f}%" if share >= 0.01 else "<1%")
                           for c, share in present[:12])
        more = f" and {len(present) - 12} more" if len(present) > 12 else ""
        h, w = labels.shape
        size = f"{w} x {h} px" + ("" if (w, h) == tuple(original_size) else
                                  f" (downscaled from {original_size[0]} x {original_size[1]})")
        vfm = f" + {settings.vfm}" if get_method(settings.method).needs_vfm else ""
        lines = [
            f"**Segmented in {seconds:.2f} s** with {method_titles()[settings.method]} (CLIP {settings.clip}{vfm}, "
            f"on {self.store.base.device.type}) · {size} · {len(names)} classes, {len(present)} present",
            f"Present: {shares}{more}.",
        ]
        if load_seconds is not None:
            lines.append(f"Loading {settings.clip} + {settings.vfm} on first use took {load_seconds:.1f} s.")
        if text_seconds is not None:
            lines.append(f"Encoding the class names took {text_seconds:.1f} s (cached for the next request).")
        if self.random_weights:
            lines.append("RANDOM WEIGHTS: the output is meaningless (testing only).")
        return DemoResult(pixels, labels, tuple(names), seconds, "  \n".join(lines), files, comparison)

    def _new_folder(self) -> Path:
        self._count += 1
        folder = self.out_dir / f"{self._count:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        old = sorted(p for p in self.out_dir.iterdir() if p.is_dir() and p.name.isdigit())[:-self.keep]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder


# ---- the page --------------------------------------------------------------------------------

CSS = """
.pc-warning { background: #fff4e5; border: 1px solid #f0a33a; border-radius: 6px; padding: 0 10px; }
.pc-warning p { margin: 4px 0 !important; }
.pc-limits { color: #555; font-size: 0.88em; }
#pc-status { min-height: 1.5em; }
#pc-status.pc-error { background: #fdecea; border: 1px solid #e0433b; border-radius: 6px; padding: 2px 10px; }
#pc-status.pc-busy { color: #555; }
/* side by side: each overlay at full cell width with its caption under it, not over its legend */
#pc-compare-gallery .grid-wrap { min-height: 0 !important; max-height: none !important; overflow-y: visible; }
#pc-compare-gallery .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }
#pc-compare-gallery .thumbnail-lg > img { height: auto; }
#pc-compare-gallery .caption-label { position: static; max-width: none; border: 0; border-radius: 0;
                                     opacity: 1; text-align: center; }
footer { display: none !important; }
"""

INTRO = """## ProxyCLIP: open-vocabulary segmentation
Name the classes you look for and every pixel goes to one of them, with no training: CLIP's dense features
pooled by *proxy attention* from DINO, DINOv2, SAM or MAE ([ECCV 2024](https://arxiv.org/abs/2408.04883))."""


def payload_path(payload, out_dir: Path) -> tuple[str | None, str | None]:
    """An image input as Gradio sends it (without preprocessing) -> (local path, original file name).

    Uploads arrive as files in Gradio's cache (checked by Gradio); a ``data:`` URL (API clients)
    is decoded into ``out_dir``.
    """
    if payload is None:
        return None, None
    if isinstance(payload, str):
        return payload, Path(payload).name
    if not isinstance(payload, dict):
        raise ImageError("the image input is not a file; upload an image")
    name = payload.get("orig_name")
    if payload.get("path"):
        return payload["path"], name or Path(payload["path"]).name
    url = payload.get("url") or ""
    if url.startswith("data:") and "," in url:
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=False)
        except (binascii.Error, ValueError):
            raise ImageError("the image data is not valid base64") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="upload-", dir=out_dir)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return tmp, name or "image"
    raise ImageError("no image: upload one, paste one, take one with the webcam, or click an example")


def build_ui(app: DemoApp):
    """The Gradio page (a ``gr.Blocks``); launch it with :func:`launch_kwargs`.

    Inputs and the Segment button on the left (the button in sight on a 1280 x 800 window),
    outputs on the right: the status line above the result, then the side-by-side comparison,
    then the downloads. A request that fails leaves the previous result where it is and says why
    in the status line until the next request; a request in progress says so there.
    """
    import gradio as gr

    d = app.defaults
    limits = app.limits
    with gr.Blocks(title="ProxyCLIP demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        if app.random_weights:
            gr.Markdown("**Random weights** (`--random-weights`): the segmentations are meaningless; this server "
                        "is for testing the page only.", elem_classes="pc-warning")
        has_result = gr.State(False)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard", "webcam"],
                                 height=230, elem_id="pc-image")
                vocab = gr.Dropdown([CUSTOM, *VOCABULARIES], value=CUSTOM, elem_id="pc-vocab", label="Vocabulary")
                classes = gr.Textbox(
                    label="Classes", lines=2, max_lines=4, max_length=limits.max_text, elem_id="pc-classes",
                    placeholder="sky, grass, house; building, tree",
                    info="typed (commas or new lines between classes, '; ' between synonyms: cat; kitten), or a "
                         "benchmark's. Label PNG pixel value = position in this list, from 0.")
                button = gr.Button("Segment", variant="primary", elem_id="pc-run")
                with gr.Row():
                    clip = gr.Dropdown(app.store.clip_names, value=d.clip, label="CLIP", elem_id="pc-clip",
                                       info="others load on first use")
                    vfm = gr.Dropdown(app.store.vfm_names, value=d.vfm, label="VFM (proxy attention)",
                                      elem_id="pc-vfm", info="others load on first use")
                compare = gr.Checkbox(False, label="Compare every method side by side",
                                      elem_id="pc-compare")
                with gr.Accordion("Advanced settings", open=False):
                    method = gr.Radio([(v, k) for k, v in method_titles().items()], value=app.default_method,
                                      label="Method", info="the training-free methods; those without a VFM ignore it")
                    option_controls = []
                    for name, entry in method_options().items():
                        label = f"{name} ({', '.join(entry['methods'])})"
                        if entry["choices"]:
                            control = gr.Dropdown(list(entry["choices"]), value=entry["default"], label=label,
                                                  info=entry["help"])
                        else:
                            control = gr.Number(value=entry["default"], label=label, info=entry["help"])
                        option_controls.append(control)
                    bg = gr.Slider(0.0, 1.0, value=d.bg_threshold, step=0.01, label="background threshold",
                                   info="pixels less certain than this go to the first class; 0 = off")
                    sizes = sorted({56, 112, 224, 336, 448, 560, 672, d.window, d.stride})
                    window = gr.Slider(min(sizes), max(sizes), value=d.window, step=8, label="window (px)")
                    stride = gr.Slider(min(sizes), max(sizes), value=d.stride, step=8,
                                       label="stride (px, at most the window)")
                gr.Examples([[str(EXAMPLES_DIR / f), CUSTOM, text] for f, text in EXAMPLES],
                            inputs=[image, vocab, classes], label="Examples (click one, then Segment)")
                gr.Markdown(f"Limits: {limits.describe()}. Requests are served one at a time, in a queue.",
                            elem_classes="pc-limits", elem_id="pc-limits")
            with gr.Column(scale=6, min_width=480):
                status = gr.Markdown("Upload an image, name the classes, then press **Segment**.",
                                     elem_id="pc-status")
                result = gr.AnnotatedImage(label="Segmentation (hover a class to highlight it)", height=400,
                                           elem_id="pc-result", format="png")
                gallery = gr.Gallery(label="Every method, side by side", columns=3, height="auto",
                                     visible=False, elem_id="pc-compare-gallery", object_fit="contain",
                                     preview=False, format="png", show_label=False)  # png: sharp legend text
                files = gr.File(label="Downloads: label map (palette PNG) and overlay with legend",
                                file_count="multiple", interactive=False, elem_id="pc-files", height=120)

        def on_vocab(label):
            if label == CUSTOM or not label:
                return gr.Textbox(interactive=True), gr.Slider(value=d.bg_threshold)
            try:
                classes_, _, threshold = vocabulary(label)
            except ProxyCLIPError as exc:
                raise gr.Error(str(exc), duration=30, print_exception=False) from None
            return gr.Textbox(value=format_classes(classes_), interactive=False), gr.Slider(value=threshold)

        def on_start():
            return gr.Markdown("Segmenting ...", elem_classes=["pc-busy"])

        def failed(message: str, had_result: bool):
            note = " The result shown is from an earlier request." if had_result else ""
            return (gr.skip(), gr.Markdown(f"**Not segmented:** {message}{note}", elem_classes=["pc-error"]),
                    gr.skip(), gr.skip(), had_result)

        option_defaults = {k: v["default"] for k, v in method_options().items()}
        tracker = gr.Progress()  # Gradio fills it in for a request (a bar over the result)

        # progress comes first: Gradio passes a Progress only to a positional parameter, and the method
        # options (as many as the registry has) arrive last, as *option_values
        def on_segment(progress=tracker, image_payload=None, vocab_label=None, text=None, clip_name=None,
                       vfm_name=None, method_name=None, bg_=None, window_=None, stride_=None, compare_=False,
                       had_result=False, *option_values):
            try:
                options = dict(option_defaults)
                for (name, default), value in zip(option_defaults.items(), option_values):
                    options[name] = type(default)(value)
                settings = Settings(clip=clip_name, vfm=vfm_name, method=method_name, bg_threshold=float(bg_),
                                    window=int(window_), stride=int(stride_), compare=bool(compare_),
                                    options=options)
            except (TypeError, ValueError) as exc:
                return failed(f"bad setting: {exc}", had_result)

            def report(fraction: float | None, what: str) -> None:
                progress(fraction, desc=what)

            path, decoded = None, False
            try:
                path, name = payload_path(image_payload, app.out_dir)
                decoded = isinstance(image_payload, dict) and not image_payload.get("path") and path is not None
                out = app.run(path, vocab_label, text, settings, image_name=name, progress=report)
            except ProxyCLIPError as exc:
                return failed(str(exc), had_result)
            except Exception as exc:  # noqa: BLE001 -- a page shows a message, the log keeps the traceback
                log.exception("segmentation failed")
                first = str(exc).splitlines()[0] if str(exc) else ""
                return failed(f"segmentation failed ({type(exc).__name__}: {first[:200]}); the server log has "
                              "the details", had_result)
            finally:
                if decoded:  # a data: URL we wrote to a file
                    Path(path).unlink(missing_ok=True)
            return (
                gr.AnnotatedImage(value=(out.pixels, out.annotations()), color_map=out.color_map()),
                gr.Markdown(out.summary, elem_classes=[]),
                [str(p) for p in out.files],
                gr.Gallery(value=out.comparison, visible=bool(out.comparison)),
                True,
            )

        vocab.change(on_vocab, vocab, [classes, bg], queue=False, show_progress="hidden")
        button.click(on_start, None, status, queue=False, show_progress="hidden").then(
            on_segment, [image, vocab, classes, clip, vfm, method, bg, window, stride, compare, has_result,
                         *option_controls],
            [result, status, files, gallery, has_result], preprocess=False, concurrency_limit=1, api_name="segment",
            show_progress_on=[result])  # the bar over the result; the status line stays readable
    return demo


def launch_kwargs(app: DemoApp) -> dict:
    """Arguments of ``Blocks.launch`` that every demo server uses: offline, limits, look."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return dict(
        share=False,
        ssr_mode=False,
        show_error=False,
        max_file_size=app.limits.max_upload_bytes,
        allowed_paths=[str(EXAMPLES_DIR)],
        theme=gr.themes.Soft(primary_hue="teal", font=system, font_mono=mono),  # local fonts: no font CDN
        css=CSS,
        footer_links=[],
    )


# ---- the sub-command -------------------------------------------------------------------------

def _clip_spec(text: str) -> tuple[str, str | None, str | None]:
    """NAME[:TAG][=FILE] -> (name, tag, file)."""
    spec, _, weights = text.partition("=")
    name, _, tag = spec.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME[:TAG][=FILE], e.g. ViT-L-14=clip-l14.safetensors")
    return name, tag or None, weights or None


def _vfm_spec(text: str) -> tuple[str, str | None]:
    """NAME[=FILE] -> (name, file)."""
    from .options import vfm_key

    name, _, weights = text.partition("=")
    return vfm_key(name), weights or None


def add_demo_parser(sub) -> None:
    """Register ``proxyclip demo`` on the CLI's sub-parsers."""
    from .options import add_image_args, add_inference_args, add_model_args

    p = sub.add_parser(
        "demo",
        help="browser demo: upload an image, name the classes, see the segmentation",
        description="Serve a web page (Gradio; needs the web extra: pip install 'proxyclip[web]') where one "
                    "uploads an image, names classes or picks a benchmark vocabulary, and sees the segmentation, "
                    "with the label PNG to download and a side-by-side view of vanilla CLIP / MaskCLIP / ProxyCLIP. "
                    "The models are loaded once at start; requests run one at a time. Runs offline with local "
                    "weight files (--clip-weights, --vfm-weights). Stop it with Ctrl-C.",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 serves other machines too (default: %(default)s)")
    g.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    g.add_argument("--queue-size", type=int, default=32,
                   help="requests that may wait in the queue; more are refused (default: %(default)s)")
    g.add_argument("--add-clip", action="append", default=[], type=_clip_spec, metavar="NAME[:TAG][=FILE]",
                   help="offer another CLIP in the page, loaded on first use (repeatable), e.g. "
                        "ViT-L-14=clip-l14.safetensors; TAG defaults as for --clip-pretrained")
    g.add_argument("--add-vfm", action="append", default=[], type=_vfm_spec, metavar="NAME[=FILE]",
                   help="offer another VFM in the page, loaded on first use (repeatable), e.g. "
                        "dinov2_vitb14_reg=dinov2.safetensors")
    lim = p.add_argument_group("limits (shown in the page)")
    lim.add_argument("--max-upload-mb", type=float, default=DemoLimits.max_upload_mb, help="largest upload (default: %(default)s)")
    lim.add_argument("--max-side", type=int, default=DemoLimits.max_side,
                     help="images with a longer side are refused (default: %(default)s)")
    lim.add_argument("--work-side", type=int, default=DemoLimits.work_side,
                     help="images with a longer side are downscaled to it before segmenting; the outputs "
                          "have that size (default: %(default)s)")
    lim.add_argument("--max-classes", type=int, default=DemoLimits.max_classes, help="classes per request (default: %(default)s)")
    add_model_args(p)
    add_image_args(p)
    add_inference_args(p)
    p.set_defaults(func=run_demo)


def make_app(args: argparse.Namespace) -> DemoApp:
    """Build the models the options name (the defaults now, the --add-* ones on first use) and the app."""
    from functools import partial

    from ..model.clip import load_clip
    from ..model.config import default_pretrained
    from ..model.vfm import VFM_BUILDERS
    from .options import build_model, config_from_args

    if min(args.max_upload_mb, args.max_side, args.work_side, args.max_classes, args.queue_size) <= 0:
        raise ProxyCLIPError("--max-upload-mb, --max-side, --work-side, --max-classes and --queue-size must be positive")
    config = config_from_args(args)
    base = build_model(args, config.updated(method="proxyclip"))  # with the VFM, which some methods use
    clips = {name: (default_pretrained(name, tag),
                    partial(load_clip, name, default_pretrained(name, tag), weights, args.random_weights))
             for name, tag, weights in args.add_clip if name != config.clip}
    vfms = {name: partial(VFM_BUILDERS[name], weights=weights, random_weights=args.random_weights)
            for name, weights in args.add_vfm if name != config.vfm}
    limits = DemoLimits(max_upload_mb=args.max_upload_mb, max_side=args.max_side, work_side=args.work_side,
                        max_classes=args.max_classes, max_names=max(1000, 5 * args.max_classes))
    return DemoApp(ModelStore(base, clips, vfms), limits, random_weights=args.random_weights,
                   default_method=config.method)


def run_demo(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no phoning home
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ProxyCLIPError(WEB_EXTRA_HINT) from None
    print("proxyclip demo: loading models ...", file=sys.stderr)
    app = make_app(args)
    demo = build_ui(app)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    print(f"proxyclip demo: serving on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    try:
        demo.launch(server_name=args.host, server_port=args.port, **launch_kwargs(app))
    except OSError as exc:  # port taken, address not available
        raise ProxyCLIPError(f"cannot serve on {args.host}:{args.port}: {exc}; pick another --port") from None
    return 0
