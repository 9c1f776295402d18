"""PAMR: equal to the published module (oracle: tests/oracles/pamr_published.py), and its properties."""

from __future__ import annotations

import pytest
import torch
from oracles import pamr_published

from proxyclip.model.refine import PAMR_DILATIONS, PAMR_ITERATIONS, REFINERS, pamr, pamr_affinity


def test_published_parameters_are_the_default():
    assert (PAMR_ITERATIONS, tuple(PAMR_DILATIONS)) == (10, (8, 16))  # NACLIP naclip.py: pamr_steps=10, pamr_stride=(8, 16)
    torch.manual_seed(0)
    x, logits = torch.randn(1, 3, 40, 50), torch.randn(1, 5, 40, 50)
    torch.testing.assert_close(REFINERS["pamr"](x, logits), pamr(x, logits, 10, (8, 16)))


@pytest.mark.parametrize(("size", "iterations", "dilations"), [
    ((40, 50), 10, (8, 16)),
    ((13, 70), 10, (8, 16)),  # smaller than a dilation on one side: replicate padding wider than the image
    ((33, 29), 3, (1, 2, 4)),
    ((25, 25), 1, (1,)),
])
def test_matches_published(size, iterations, dilations):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    logits = torch.randn(2, 6, *size) * 0.1
    expected = pamr_published.pamr(x, logits, iterations, dilations)
    torch.testing.assert_close(pamr(x, logits, iterations, dilations), expected, rtol=0, atol=1e-5)


def test_resizes_other_sized_logits_as_published():
    torch.manual_seed(0)
    x, logits = torch.randn(1, 3, 40, 50), torch.randn(1, 4, 10, 13)
    torch.testing.assert_close(pamr(x, logits), pamr_published.pamr(x, logits), rtol=0, atol=1e-5)


def test_affinities_are_a_convex_combination():
    torch.manual_seed(0)
    weights = pamr_affinity(torch.randn(2, 3, 30, 40))
    assert weights.shape == (2, 16, 30, 40) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 30, 40))


def test_constant_logits_and_a_constant_label_map_stay():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 40, 50)
    constant = torch.full((1, 3, 40, 50), 0.25)
    torch.testing.assert_close(pamr(x, constant), constant)
    one_label = torch.randn(1, 3, 40, 50) * 0.01
    one_label[:, 1] += 1.0  # class 1 wins everywhere
    assert (pamr(x, one_label).argmax(1) == 1).all()


def test_the_labels_move_to_the_image_edge():
    """Logits whose boundary is 6 px off the image's edge are pulled to the edge."""
    x = torch.zeros(1, 3, 48, 64)
    x[..., 32:] = 1.0  # an edge between columns 31 and 32
    logits = torch.zeros(1, 2, 48, 64)
    logits[:, 0, :, :26] = 1.0  # the logits' boundary between columns 25 and 26
    logits[:, 1, :, 26:] = 1.0
    before = logits.argmax(1)
    after = pamr(x, logits).argmax(1)
    assert (before[:, :, 26:32] == 1).all() and (after[:, :, 26:32] == 0).all()  # now on the image's side
    assert (after[:, :, 32:] == 1).all() and (after[:, :, :26] == 0).all()


def test_a_flat_image_averages_the_neighbours():
    """On a constant image every neighbour weighs the same: the logits only blur."""
    weights = pamr_affinity(torch.ones(1, 3, 20, 20))
    torch.testing.assert_close(weights, torch.full((1, 16, 20, 20), 1 / 16))
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 20, 20)
    out = pamr(torch.ones(1, 3, 20, 20), logits, iterations=1)
    assert out.max() <= logits.max() and out.min() >= logits.min()
