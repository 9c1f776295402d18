"""Window placement, padding and averaging."""

import pytest
import torch

from proxyclip.model.sliding import crop_windows, pad_amounts, slide_logits, window_boxes


@pytest.mark.parametrize("h,w", [(336, 336), (336, 448), (500, 375), (100, 700), (20, 30), (1, 1)])
def test_windows_cover_the_image_and_stay_inside(h, w):
    boxes = window_boxes(h, w, 336, 112)
    cover = torch.zeros(h, w)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(336, h), min(336, w))
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


def test_published_window_count():
    # mmseg slide mode: grids = max(H - crop + stride - 1, 0) // stride + 1 per axis
    assert len(window_boxes(336, 448, 336, 112)) == 2
    assert len(window_boxes(448, 896, 224, 112)) == 3 * 7
    assert window_boxes(336, 500, 336, 112)[-1] == (0, 336, 164, 500)  # last window shifted back inside


def test_padding_is_even_and_reaches_the_multiple():
    assert pad_amounts(336, 336, 56) == (0, 0, 0, 0)
    left, right, top, bottom = pad_amounts(30, 101, 56)
    assert (30 + top + bottom) % 56 == 0 and (101 + left + right) % 56 == 0
    assert (top, bottom) == (13, 13) and (left, right) == (5, 6)


def test_crops_are_zero_padded():
    image = torch.ones(3, 30, 40)
    crops, pad = crop_windows(image, window_boxes(30, 40, 336, 112), 56)
    assert crops.shape == (1, 3, 56, 56)
    left, right, top, bottom = pad
    assert crops[0, :, top : top + 30, left : left + 40].eq(1).all()
    assert crops.sum() == 3 * 30 * 40


def test_overlaps_are_averaged():
    image = torch.zeros(3, 8, 12)
    calls = []

    def window_fn(crops):  # a logit equal to the window's index
        calls.append(crops.shape[0])
        start = sum(calls[:-1])
        return torch.arange(start, start + crops.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand(
            -1, 1, *crops.shape[-2:]
        )

    (out,) = slide_logits([image], window_fn, num_outputs=1, window=8, stride=2, pad_multiple=8, batch_size=2)
    boxes = window_boxes(8, 12, 8, 2)
    expected = torch.zeros(1, 8, 12)
    count = torch.zeros(1, 8, 12)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        expected[:, y1:y2, x1:x2] += i
        count[:, y1:y2, x1:x2] += 1
    torch.testing.assert_close(out, expected / count)
    assert calls == [2, 1]  # 3 windows in batches of 2


def test_batch_size_does_not_change_results(model):
    torch.manual_seed(0)
    image = torch.randn(3, 150, 260)
    text = model.encode_classes(["a", "b", "c"])
    one = model.with_config(window_batch=1).predict_logits(image, text)
    many = model.with_config(window_batch=64).predict_logits(image, text)
    torch.testing.assert_close(one, many, rtol=0, atol=1e-5)


def test_windows_of_several_images_share_batches_without_changing_results(model):
    torch.manual_seed(0)
    images = [torch.randn(3, 150, 260), torch.randn(3, 112, 112), torch.randn(3, 40, 70), torch.randn(3, 200, 130)]
    text = model.encode_classes(["a", "b", "c"])
    sizes = [(75, 130), None, (40, 70), (210, 100)]
    together = model.with_config(window_batch=5).predict_logits_batch(images, text, sizes)
    for image, size, joint in zip(images, sizes, together):
        alone = model.predict_logits(image, text, size)
        assert joint.shape == alone.shape
        torch.testing.assert_close(joint, alone, rtol=0, atol=1e-5)
