"""The sliding window: window placement, Gaussian weights, blending and test-time flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from r2d2_hpc.inference.sliding import (
    WindowSettings,
    flip_sets,
    gaussian_weights,
    predict_2d,
    predict_3d,
    window_starts,
)

CPU = torch.device("cpu")


class Pointwise(nn.Module):
    """Two-class logits ``[0, 3x - 1]`` voxel by voxel: they depend on the voxel's value only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), 3.0 * x[:, :1] - 1.0], dim=1)


class Ramp(nn.Module):
    """Logits of class 1 grow along the last axis, whatever the input: not flip-equivariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2.0, 2.0, x.shape[-1]).expand_as(x[:, :1])
        return torch.cat([torch.zeros_like(ramp), ramp], dim=1)


@pytest.mark.parametrize(
    ("extent", "window", "overlap", "expected"),
    [
        (10, 4, 0.5, [0, 2, 4, 6]),
        (4, 8, 0.5, [0]),
        (8, 8, 0.5, [0]),
        (9, 4, 0.0, [0, 2, 5]),
        (20, 8, 0.25, [0, 6, 12]),
    ],
)
def test_window_starts_cover_the_extent(
    extent: int, window: int, overlap: float, expected: list[int]
) -> None:
    starts = window_starts(extent, window, overlap)
    assert starts == expected
    covered = np.zeros(max(extent, window), dtype=bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()


def test_gaussian_weights_peak_at_the_centre_and_stay_positive() -> None:
    weights = gaussian_weights([9, 5, 4], 0.125).numpy()
    assert weights.shape == (9, 5, 4)
    assert weights.max() == pytest.approx(1.0)
    assert weights.min() > 0
    assert np.allclose(weights, weights[::-1, ::-1, ::-1])  # symmetric about the centre
    # Separable: along axis 0 through the centre, exp(-d^2 / (2 sigma^2)) with sigma = 0.125 * 9.
    assert weights[8, 2, 1] / weights[4, 2, 1] == pytest.approx(
        np.exp(-0.5 * (4 / (0.125 * 9)) ** 2), rel=1e-5
    )


def test_flip_sets_are_every_subset_of_the_spatial_dims() -> None:
    assert flip_sets(2) == [(), (2,), (3,), (2, 3)]
    assert len(flip_sets(3)) == 8 and len(set(flip_sets(3))) == 8


def test_blended_windows_equal_a_pointwise_model_on_the_whole_volume() -> None:
    # Overlapping windows weighted by the Gaussian must average identical values back to that value.
    rng = np.random.default_rng(1)
    image = rng.normal(0.0, 1.0, (1, 11, 9, 6)).astype(np.float32)
    logits = predict_3d(Pointwise(), image, [4, 4, 4], 1, WindowSettings(batch_size=3, overlap=0.5), CPU)
    expected = Pointwise()(torch.from_numpy(image)[None])[0].numpy()
    assert logits.shape == (2, 11, 9, 6)
    assert np.allclose(logits, expected, atol=1e-5)


def test_two_d_prediction_keeps_the_axis_order() -> None:
    rng = np.random.default_rng(2)
    image = rng.normal(0.0, 1.0, (1, 5, 7, 3)).astype(np.float32)
    expected = Pointwise()(torch.from_numpy(image)[None])[0].numpy()
    for axis in (0, 1, 2):
        logits = predict_2d(Pointwise(), image, axis, [8, 8], 4, WindowSettings(batch_size=2), CPU)
        assert logits.shape == (2, 5, 7, 3)
        assert np.array_equal(logits, expected)  # no blending in 2D: the model's own numbers


def test_tta_averages_the_flipped_predictions() -> None:
    image = np.zeros((1, 4, 4, 6), dtype=np.float32)
    plain = predict_3d(Ramp(), image, [4, 4, 6], 1, WindowSettings(tta=False), CPU)
    flipped = predict_3d(Ramp(), image, [4, 4, 6], 1, WindowSettings(tta=True), CPU)
    assert np.allclose(plain[1, 0, 0], np.linspace(-2.0, 2.0, 6), atol=1e-6)
    # Over the 8 flips, half see the ramp mirrored along the last axis: the average is 0 everywhere.
    assert np.allclose(flipped, 0.0, atol=1e-6)
