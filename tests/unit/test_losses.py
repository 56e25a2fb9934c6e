"""Tests of the Dice + cross-entropy loss and its deep-supervision sum (tiny CPU tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from r2d2_hpc.data.augment import IGNORE_INDEX
from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train.losses import (
    DiceCELoss,
    deep_supervision_loss,
    deep_supervision_parts,
    deep_supervision_weights,
    downsample_target,
)


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """Two voxels, two classes: logits (1, 2, 2) and labels (1, 2)."""
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # voxel 0 favours class 0, voxel 1 favours class 1
    target = torch.tensor([[0, 1]])
    return logits, target


def test_dice_ce_equals_hand_computation() -> None:
    logits, target = _tiny()
    p0 = 1 / (1 + math.exp(-2.0))  # softmax([2, 0])[0]
    p1 = 1 / (1 + math.exp(-1.0))  # softmax([0, 1])[1]
    ce = (-math.log(p0) - math.log(p1)) / 2
    # Foreground (class 1) batch Dice: tp = p1, predicted mass = (1 - p0) + p1, reference mass = 1.
    smooth = 1e-5
    dice = (2 * p1 + smooth) / ((1 - p0) + p1 + 1 + smooth)
    loss_fn = DiceCELoss(num_classes=2, dice_weight=0.7, ce_weight=1.3, smooth=smooth)
    parts = loss_fn.parts(logits, target)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["dice"].item() == pytest.approx(1 - dice, rel=1e-6)
    assert loss_fn(logits, target).item() == pytest.approx(1.3 * ce + 0.7 * (1 - dice), rel=1e-6)


def test_include_background_averages_both_classes() -> None:
    logits, target = _tiny()
    p0 = 1 / (1 + math.exp(-2.0))
    p1 = 1 / (1 + math.exp(-1.0))
    dice_bg = 2 * p0 / (p0 + (1 - p1) + 1)
    dice_fg = 2 * p1 / ((1 - p0) + p1 + 1)
    loss_fn = DiceCELoss(2, ce_weight=0.0, smooth=0.0, include_background=True)
    assert loss_fn(logits, target).item() == pytest.approx(1 - (dice_bg + dice_fg) / 2, rel=1e-6)


def test_batch_dice_sums_over_the_batch_before_dividing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 4, 5)
    target = torch.randint(0, 3, (3, 4, 5))
    loss_fn = DiceCELoss(3, ce_weight=0.0, smooth=0.0)
    probs = logits.softmax(1)
    one_hot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    tp = (probs * one_hot).sum((0, 2, 3))
    dice = 2 * tp / (probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3)))
    assert loss_fn(logits, target).item() == pytest.approx(1 - dice[1:].mean().item(), rel=1e-5)


def test_ignored_voxels_change_nothing() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6, 5)
    target = torch.randint(0, 3, (2, 6, 5))
    target[:, 4:, :] = IGNORE_INDEX
    loss_fn = DiceCELoss(3)
    reference = loss_fn.parts(logits, target)
    changed = logits.clone()
    changed[:, :, 4:, :] = torch.randn(2, 3, 2, 5) * 50.0
    changed.requires_grad_(True)
    other = loss_fn.parts(changed, target)
    for key in ("loss", "ce", "dice"):
        assert other[key].item() == pytest.approx(reference[key].item(), rel=1e-6, abs=1e-7)
    other["loss"].backward()
    assert torch.count_nonzero(changed.grad[:, :, 4:, :]) == 0
    assert torch.count_nonzero(changed.grad[:, :, :4, :]) > 0
    # Dropping the ignored rows altogether gives the same loss too.
    cropped = loss_fn(logits[:, :, :4, :], target[:, :4, :])
    assert cropped.item() == pytest.approx(reference["loss"].item(), rel=1e-6)


def test_all_ignored_gives_zero_ce_not_nan() -> None:
    loss_fn = DiceCELoss(2)
    target = torch.full((1, 3, 3), IGNORE_INDEX, dtype=torch.uint8)
    parts = loss_fn.parts(torch.randn(1, 2, 3, 3), target)
    assert parts["ce"].item() == 0.0
    assert math.isfinite(parts["loss"].item())


def test_perfect_prediction_gives_near_zero_dice_loss() -> None:
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40.0
    parts = DiceCELoss(3).parts(logits, target)
    assert parts["dice"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["ce"].item() == pytest.approx(0.0, abs=1e-5)


def test_gradients_exist_and_amp_dtypes_are_computed_in_float32() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    loss = DiceCELoss(3)(logits, target)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum().item() > 0
    reference = DiceCELoss(3)(logits.detach().float(), target)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_bad_shapes_and_settings_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="out channels"):
        DiceCELoss(3)(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="does not match"):
        DiceCELoss(2)(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ConfigError, match="integer labels"):
        DiceCELoss(2)(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ConfigError, match="not both 0"):
        DiceCELoss(2, dice_weight=0.0, ce_weight=0.0)


def test_downsample_target_keeps_ignore_and_labels() -> None:
    target = torch.tensor(
        [[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]], dtype=torch.uint8
    )
    small = downsample_target(target, (2, 2))
    assert small.dtype == torch.uint8
    assert small.tolist() == [[[0, 1], [2, 255]]]
    assert downsample_target(target, (4, 4)) is target
    target3d = torch.full((1, 4, 4, 4), 1, dtype=torch.long)
    target3d[0, 2:, :, :] = IGNORE_INDEX
    small3d = downsample_target(target3d, (2, 2, 2))
    assert small3d[0, 1].unique().tolist() == [IGNORE_INDEX]
    assert small3d[0, 0].unique().tolist() == [1]


def test_deep_supervision_weights_and_sum() -> None:
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    torch.manual_seed(3)
    target = torch.randint(0, 2, (2, 8, 8))
    target[:, :, 6:] = IGNORE_INDEX
    outputs = [torch.randn(2, 2, 8, 8), torch.randn(2, 2, 4, 4), torch.randn(2, 2, 2, 2)]
    loss_fn = DiceCELoss(2)
    expected = sum(
        w * loss_fn(out, downsample_target(target, out.shape[2:]))
        for w, out in zip([4 / 7, 2 / 7, 1 / 7], outputs, strict=True)
    )
    assert deep_supervision_loss(loss_fn, outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    parts = deep_supervision_parts(loss_fn, outputs, target)
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # A single tensor is the plain loss; explicit weights are used as given.
    assert deep_supervision_loss(loss_fn, outputs[0], target).item() == pytest.approx(
        loss_fn(outputs[0], target).item()
    )
    two = deep_supervision_loss(loss_fn, outputs[:2], target, weights=[1.0, 1.0])
    assert two.item() == pytest.approx(
        (loss_fn(outputs[0], target) + loss_fn(outputs[1], downsample_target(target, (4, 4)))).item(),
        rel=1e-6,
    )
    with pytest.raises(ConfigError, match="one weight per output"):
        deep_supervision_loss(loss_fn, outputs, target, weights=[1.0])
