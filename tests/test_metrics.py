"""The metric against hand-computed values and against MMSegmentation's histc formulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proxyclip.evaluation.metrics import intersect_and_union, summarize

PRED = torch.tensor([[0, 1, 2], [1, 1, 0]])
LABEL = torch.tensor([[0, 1, 1], [255, 1, 2]])
# Pixels kept (pred, label): (0,0) (1,1) (2,1) (1,1) (0,2); the 255 pixel is dropped.
# intersect [1,2,0], pred [2,2,1], label [1,3,1], union [2,3,2]


def test_areas_by_hand():
    areas = intersect_and_union(PRED, LABEL, 3, 255)
    assert areas.dtype == torch.int64
    assert areas.tolist() == [[1, 2, 0], [2, 2, 1], [1, 3, 1]]


def test_summary_by_hand():
    m = summarize(intersect_and_union(PRED, LABEL, 3, 255), ["a", "b", "c"])
    # IoU = [1/2, 2/3, 0]; Acc = [1, 2/3, 0]; aAcc = 3/5
    assert m["mIoU"] == 38.89 and m["aAcc"] == 60.0 and m["mAcc"] == 55.56
    assert [c["IoU"] for c in m["per_class"]] == [50.0, 66.67, 0.0]
    assert [c["class"] for c in m["per_class"]] == ["a", "b", "c"]
    assert m["num_classes_scored"] == 3


def test_class_absent_everywhere_is_left_out_of_the_mean():
    m = summarize(intersect_and_union(PRED, LABEL, 4, 255), ["a", "b", "c", "d"])
    assert m["mIoU"] == 38.89 and m["mAcc"] == 55.56  # class d: union 0 -> NaN -> excluded
    assert m["per_class"][3] == {"class": "d", "IoU": None, "Acc": None}
    assert m["num_classes_scored"] == 3


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    pred = torch.tensor([[3, 1, 2], [1, 1, 0]])  # class 3 predicted where the label is 0
    m = summarize(intersect_and_union(pred, LABEL, 4, 255), ["a", "b", "c", "d"])
    # intersect [0,2,0,0], pred [1,2,1,1], label [1,3,1,0], union [2,3,2,1]
    assert [c["IoU"] for c in m["per_class"]] == [0.0, 66.67, 0.0, 0.0]
    assert m["mIoU"] == 16.67 and m["per_class"][3]["Acc"] is None and m["mAcc"] == 22.22


def test_labels_outside_the_classes_count_only_as_prediction_area():
    """MMSegmentation's histc skips label values >= C; the prediction there still counts."""
    pred = torch.tensor([[1, 1]])
    label = torch.tensor([[1, 7]])
    assert intersect_and_union(pred, label, 3, 255).tolist() == [[0, 1, 0], [0, 2, 0], [0, 1, 0]]


def test_ade847_void_and_class_255_in_both_modes():
    pred = torch.tensor([[255, 3, 3, 0]])
    label = torch.tensor([[255, 65535, 3, 0]], dtype=torch.int64)
    correct = intersect_and_union(pred, label, 847, 65535)  # void dropped, class 255 scored
    published = intersect_and_union(pred, label, 847, 255)  # class 255 dropped, void counted as prediction
    assert correct[:, [0, 3, 255]].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert published[:, [0, 3, 255]].tolist() == [[1, 1, 0], [1, 2, 0], [1, 1, 0]]
    assert summarize(correct, [str(i) for i in range(847)])["mIoU"] == 100.0
    assert summarize(published, [str(i) for i in range(847)])["mIoU"] == 75.0  # class 3: 1 / (2 + 1 - 1)


def test_sums_over_images_then_divides():
    """IoU from dataset-wide sums, not the mean of per-image IoUs."""
    a = intersect_and_union(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), 2, 255)  # per-image IoU0 = 1/2
    b = intersect_and_union(torch.tensor([[0] * 8]), torch.tensor([[0] * 8]), 2, 255)  # per-image IoU0 = 1
    m = summarize(a + b, ["x", "y"])
    assert m["per_class"][0]["IoU"] == pytest.approx(100 * 9 / 10)  # not (50 + 100) / 2
    assert m["per_class"][1]["IoU"] == 0.0


def _mmseg_histc(pred, label, num_classes, ignore_index):
    """MMSegmentation 1.x IoUMetric.intersect_and_union, verbatim in formulation."""
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    kw = dict(bins=num_classes, min=0, max=num_classes - 1)
    area_i = torch.histc(intersect.float(), **kw)
    area_p = torch.histc(pred.float(), **kw)
    area_l = torch.histc(label.float(), **kw)
    return torch.stack([area_i, area_p, area_l]).long()


@pytest.mark.parametrize("num_classes,ignore", [(2, 255), (21, 255), (150, 255), (847, 65535), (847, 255)])
def test_equals_mmseg_histc_on_random_maps(num_classes, ignore):
    g = torch.Generator().manual_seed(num_classes + ignore)
    pred = torch.randint(0, num_classes, (37, 53), generator=g)
    label = torch.randint(0, num_classes + 3, (37, 53), generator=g)  # some values past the classes
    label[torch.rand(37, 53, generator=g) < 0.1] = ignore
    label[torch.rand(37, 53, generator=g) < 0.05] = 65535 if ignore != 65535 else 255
    assert torch.equal(intersect_and_union(pred, label, num_classes, ignore), _mmseg_histc(pred, label, num_classes, ignore))


def test_empty_dataset_and_bad_shapes():
    m = summarize(np.zeros((3, 2), dtype=np.int64), ["x", "y"])
    assert m["mIoU"] is None and m["aAcc"] is None and m["num_classes_scored"] == 0
    with pytest.raises(ValueError, match="3 x 2"):
        summarize(np.zeros((3, 3)), ["x", "y"])
    with pytest.raises(ValueError, match="differ in size"):
        intersect_and_union(torch.zeros(2, 2), torch.zeros(2, 3), 2, 255)
