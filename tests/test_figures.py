"""The figures: streaming AP equals scikit-learn's, the data behind each plot, the compare grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP, tiny_dino
from PIL import Image
from sklearn.metrics import average_precision_score
from test_datasets import make_dataset

from proxyclip import ProxyCLIP, ProxyCLIPConfig
from proxyclip.apps.cli import main
from proxyclip.evaluation import figures
from proxyclip.evaluation.datasets import SegmentationDataset
from proxyclip.evaluation.presets import PRESETS
from proxyclip.model.pixels import clip_input_constants, normalise_clip_input
from proxyclip.model.vfm import VFM_BUILDERS

RANDOM_TINY = ["--clip", TINY_CLIP, "--clip-pretrained", "", "--random-weights", "--device", "cpu"]


@pytest.fixture(autouse=True)
def tiny_vfm(monkeypatch):
    monkeypatch.setitem(VFM_BUILDERS, "dino_vits16", lambda **kwargs: tiny_dino())


# ---- streaming average precision ------------------------------------------------------------------

def test_binned_ap_equals_sklearn_exactly_when_every_score_has_its_bin():
    rng = np.random.default_rng(0)
    # multiples of 2^-8 in [0.5, 1) and their negatives: 9 + 8 bits identify each (ties included)
    scores = np.concatenate([rng.integers(128, 256, 5000) / 256.0, -rng.integers(128, 256, 3000) / 256.0])
    labels = rng.random(scores.size) < 0.3 + 0.4 * (scores > 0)
    hist = figures.PairHistogram(bits=17)
    for part in np.array_split(np.arange(scores.size), 7):  # streamed in batches
        hist.add(scores[part], labels[part])
    ap, bound = hist.average_precision()
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert hist.counts() == (int(labels.sum()), int((~labels).sum()))
    assert bound > 0  # ties: the bound is loose here, but binning lost nothing


def test_binned_ap_is_within_its_bound_of_sklearn_on_exact_scores():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=20000).astype(np.float32)
    labels = rng.random(scores.size) < 1 / (1 + np.exp(-2 * scores))
    exact = average_precision_score(labels, scores)
    for bits in (10, 12, 16, 20):
        hist = figures.PairHistogram(bits=bits)
        hist.add(scores, labels)
        ap, bound = hist.average_precision()
        assert abs(ap - exact) <= bound + 1e-12, bits
    coarse = figures.PairHistogram(bits=10)
    coarse.add(scores, labels)
    ap, bound = coarse.average_precision()
    assert abs(ap - exact) > 1e-3 and bound < 0.1  # coarse bins do change the AP, within the bound
    fine = figures.PairHistogram(bits=20)  # the default: 2^-11 relative resolution
    fine.add(scores, labels)
    assert abs(fine.average_precision()[0] - exact) <= fine.average_precision()[1] < 1e-4


def test_bins_preserve_order_and_invert():
    values = np.array([-3.5, -1.0, -1e-9, 0.0, 1e-9, 0.25, 1.0, 7.0], dtype=np.float32)
    bins = figures.ordered_bins(values, 20)
    assert (np.diff(bins) > 0).all()
    floors = figures.bin_floor(bins, 20)
    assert (floors <= values).all() and (figures.ordered_bins(floors, 20) == bins).all()


def test_pr_curve_from_the_highest_threshold_to_full_recall():
    hist = figures.PairHistogram(bits=12)
    hist.add(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]))
    curve = hist.pr_curve()
    assert curve["recall"][0] == 0.5 and curve["precision"][0] == 1.0
    assert curve["recall"][-1] == 1.0 and curve["precision"][-1] == pytest.approx(2 / 3)  # full recall first at 0.7


def test_patch_labels_by_majority_and_pairs():
    labels = np.array([[1, 1, 2, 2],
                       [1, 3, 2, 255],
                       [255, 255, 0, 0],
                       [255, 255, 0, 3]])
    patch = figures.patch_labels(labels, (2, 2), ignore_index=255, num_classes=4)
    assert patch.tolist() == [[1, 2], [-1, 0]]
    valid, positive = figures.pair_examples(patch)
    assert valid.sum() == 3 * 2  # ordered pairs of the 3 labelled patches
    assert not valid.diagonal().any() and positive.diagonal().all()
    assert not positive[0, 1] and not valid[2].any()


def test_clip_attention_scores_are_row_stochastic():
    model = ProxyCLIP.build(ProxyCLIPConfig.create(clip=TINY_CLIP, clip_pretrained="", method="clip"), random_weights=True)
    pixels = torch.randn(2, 3, 64, 96)
    scores = figures.clip_attention_scores(model.clip, pixels)
    assert set(scores) == {"q-k", "q-q", "k-k", "v-v"}
    for value in scores.values():
        assert value.shape == (2, 24, 24)
        torch.testing.assert_close(value.sum(-1), torch.ones(2, 24))


def test_value_histogram_median_within_its_error():
    values = np.random.default_rng(2).normal(0.3, 0.2, 10001)
    hist = figures.ValueHistogram(-1, 1, 4000)
    hist.add(values)
    median, error = hist.median()
    assert abs(median - np.median(values)) <= error and error == pytest.approx(0.00025)


# ---- the figures through the command -------------------------------------------------------------

@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_dataset(PRESETS["coco_stuff"], tmp_path_factory.mktemp("coco"), n=2, size=(48, 64))


def test_fig1_numbers_equal_sklearn_on_the_same_pairs(tmp_path, coco):
    spec = json.loads((Path(figures.__file__).parents[1] / "data" / "tables" / "fig1.json").read_text())
    spec.update(vfms=["dino_vits16"], size=64)
    path = tmp_path / "fig1.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    torch.manual_seed(0)
    assert main(["reproduce", str(path), "--roots", f"coco_stuff={coco}", "--out", str(out), *RANDOM_TINY]) == 0
    data = json.loads((out / "fig1.json").read_text())
    assert (out / "fig1.png").stat().st_size > 1000 and data["images"] == 2 and data["random_weights"]
    # the same models (same seed), the pairs recomputed without streaming
    torch.manual_seed(0)
    base = ProxyCLIP.build(ProxyCLIPConfig.create(clip=TINY_CLIP, clip_pretrained="", method="clip", window=64, stride=64),
                           random_weights=True)
    dino = tiny_dino()
    model = ProxyCLIP(base.clip_model, base.tokenizer, dino, base.config.updated(method="proxyclip", vfm="dino_vits16"))
    data_set = SegmentationDataset(PRESETS["coco_stuff"], coco)
    pairs: dict[str, tuple[list, list]] = {}
    for sample in data_set.samples:
        image = torch.tensor(np.asarray(Image.open(sample.image).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        image = torch.nn.functional.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False)
        label = torch.from_numpy(data_set.read_label(sample.label))[None, None].float()
        label = torch.nn.functional.interpolate(label, size=(64, 64), mode="nearest")[0, 0].long().numpy()
        pixels = normalise_clip_input(image * 255, *clip_input_constants(*base.clip.normalisation))
        valid, positive = figures.pair_examples(figures.patch_labels(label, (4, 4), 255, 171))
        for name, value in figures.clip_attention_scores(base.clip, pixels).items():
            s, y = pairs.setdefault(f"CLIP {name}", ([], []))
            s.append(value[0].numpy()[valid])
            y.append(positive[valid])
        with torch.inference_mode():
            feats = dino(model.to_vfm_input(pixels))  # 1 x C x 8 x 8
        valid, positive = figures.pair_examples(figures.patch_labels(label, (8, 8), 255, 171))
        s, y = pairs.setdefault("dino_vits16", ([], []))
        s.append(figures.cosine_similarity(feats)[0].numpy()[valid])
        y.append(positive[valid])
    assert set(data["scores"]) == set(pairs)
    for name, (s, y) in pairs.items():
        scores, labels = np.concatenate(s), np.concatenate(y)
        entry = data["scores"][name]
        assert (entry["positives"], entry["negatives"]) == (int(labels.sum()), int((~labels).sum())), name
        assert abs(entry["ap"] - average_precision_score(labels, scores)) <= entry["ap_bound"] + 1e-12, name
        assert entry["curve"]["recall"][-1] == 1.0
    csv_rows = (out / "fig1.csv").read_text().splitlines()
    assert csv_rows[0] == "score,recall,precision,threshold" and len(csv_rows) > 5


def test_fig4_medians_of_the_windows_similarities(tmp_path, coco):
    spec = {"name": "fig4", "kind": "similarity", "dataset": "coco_stuff", "vfms": ["dino_vits16"], "limit": 2,
            "published_medians": {"dino_vitb16": 0.22}}
    path = tmp_path / "fig4.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert main(["reproduce", str(path), "--roots", f"coco_stuff={coco}", "--out", str(out), "--window", "56",
                 "--stride", "28", "--short-side", "56", *RANDOM_TINY]) == 0
    entry = json.loads((out / "fig4.json").read_text())["vfms"]["dino_vits16"]
    # recomputed: every window of every image, tiny DINO (seeded), S and A per window
    model = ProxyCLIP.build(ProxyCLIPConfig.create(clip=TINY_CLIP, clip_pretrained="", vfm="dino_vits16", window=56,
                                                   stride=28, short_side=56), random_weights=True)
    from proxyclip.model.sliding import crop_windows, window_boxes

    s_all, a_all = [], []
    for sample in SegmentationDataset(PRESETS["coco_stuff"], coco).samples:
        pixels = model.preprocess(np.asarray(Image.open(sample.image).convert("RGB")))
        crops, _ = crop_windows(pixels, window_boxes(pixels.shape[1], pixels.shape[2], 56, 28), 56)
        with torch.inference_mode():
            s, a = figures.window_similarities(model.vfm(model.to_vfm_input(crops)), 1.2, 3.0)
        s_all.append(s.numpy().ravel())
        a_all.append(a.numpy().ravel())
    s_all, a_all = np.concatenate(s_all), np.concatenate(a_all)
    assert entry["pairs"] == s_all.size
    assert abs(entry["median_before"] - np.sort(s_all)[(s_all.size - 1) // 2]) <= entry["median_before_error"] + 1e-6
    assert abs(entry["median_after"] - np.sort(a_all)[(a_all.size - 1) // 2]) <= entry["median_after_error"] + 1e-6
    assert sum(entry["before"]["counts"]) == s_all.size
    assert "dino_vits16" in (out / "fig4.csv").read_text() and (out / "fig4.png").exists()


def test_fig8_curves_are_the_sweep_runs(tmp_path):
    root = make_dataset(PRESETS["voc20"], tmp_path / "voc", n=2)
    spec = {"name": "fig8", "kind": "sweep", "title": "sweep",
            "columns": [{"key": "voc20", "title": "VOC20", "dataset": "voc20"}],
            "defaults": {"vfm": "dino_vits16"},
            "sweeps": [{"option": "beta", "values": [1.0, 1.2]}, {"option": "gamma", "values": [2.0, 3.0]}]}
    path = tmp_path / "fig8.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert main(["reproduce", str(path), "--roots", f"voc20={root}", "--out", str(out), "--window", "112",
                 "--stride", "56", "--short-side", "64", "--workers", "0", "--no-progress", *RANDOM_TINY]) == 0
    series = json.loads((out / "fig8.json").read_text())["series"]
    found = [json.loads(p.read_text()) for p in (out / "runs").glob("voc20-*.json")]
    assert len(found) == 3  # beta 1.2 and gamma 3.0 are the same configuration: one run
    by = {(r["config"]["beta"], r["config"]["gamma"]): r["metrics"]["mIoU"] for r in found}
    assert series[0]["option"] == "beta" and series[0]["mIoU"]["VOC20"] == [by[(1.0, 3.0)], by[(1.2, 3.0)]]
    assert series[1]["option"] == "gamma" and series[1]["mIoU"]["VOC20"] == [by[(1.2, 2.0)], by[(1.2, 3.0)]]
    assert (out / "fig8.png").exists() and (out / "fig8-beta.md").exists()
    assert (out / "fig8.csv").read_text().splitlines()[1] == f"beta,1.0,{by[(1.0, 3.0)]}"


def test_compare_puts_methods_side_by_side(tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["compare", str(image), "--classes", "cat, dog; puppy, sky", "--methods", "clip,proxyclip",
                 "--config", "proxyclip beta=1.0", "--vfm", "dino_vits16", "--out", str(out), *RANDOM_TINY]) == 0
    grid_image = Image.open(out / "photo_compare.png")
    assert grid_image.width > 4 * 64 and grid_image.height > 48
    # the panels are the segmenter's overlays: the first panel after the image is CLIP's
    from proxyclip.images import overlay_image

    torch.manual_seed(0)
    assert main(["compare", str(image), "--classes", "cat, dog; puppy, sky", "--methods", "clip", "--vfm",
                 "dino_vits16", "--out", str(tmp_path / "one"), *RANDOM_TINY]) == 0
    torch.manual_seed(0)
    model = ProxyCLIP.build(ProxyCLIPConfig.create(clip=TINY_CLIP, clip_pretrained="", method="clip"), random_weights=True)
    labels = model.segment(image, ["cat", "dog; puppy", "sky"]).labels
    panel = np.asarray(overlay_image(np.asarray(Image.open(image)), labels, ["cat", "dog", "sky"]))
    one = np.asarray(Image.open(tmp_path / "one" / "photo_compare.png").convert("RGB"))
    top = one.shape[0] - panel.shape[0]
    assert np.array_equal(one[top:, 64 + 8 : 64 + 8 + panel.shape[1]], panel)
    assert main(["compare", str(image), "--classes", "a, b", "--config", "proxyclip beta", "--out", str(out),
                 *RANDOM_TINY]) == 2
