"""Validation Dice from confusion counts that are summed over batches and ranks before any division.

Every rank counts true positives, false positives and false negatives per class over its own shard of the
validation set; one ``all_reduce`` (SUM) at the end of evaluation gives the counts of the whole set, and Dice is
computed once from them. Summing integers is exact and order-free, so the same checkpoint gives the same Dice on
1 or N ranks. Per-rank Dice is never averaged (that would weight ranks, not voxels, and change with N).

Convention: a class absent from both the prediction and the reference (``tp + fp + fn == 0``) has Dice NaN,
"undefined", rather than 1 or 0; ``mean_foreground_dice`` leaves NaN classes out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from r2d2_hpc.data.augment import IGNORE_INDEX
from r2d2_hpc.errors import ConfigError

COUNT_NAMES = ("tp", "fp", "fn")  # the columns of a counts tensor


def confusion_counts(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-class ``[tp, fp, fn]`` of one batch, voxels with ``ignore_index`` in ``target`` left out.

    Args:
        pred: ``(N, *spatial)`` predicted labels (e.g. ``logits.argmax(1)``).
        target: ``(N, *spatial)`` reference labels in ``0..K-1`` or ``ignore_index``.
        num_classes: K, classes including background.

    Returns:
        An int64 tensor ``(K, 3)`` on ``pred``'s device.
    """
    if pred.shape != target.shape:
        raise ConfigError(
            f"prediction of shape {tuple(pred.shape)} and reference of shape {tuple(target.shape)} "
            "differ; expected the same (N, *spatial) grid (argmax the logits over dim 1)"
        )
    valid = target != ignore_index
    pred_valid = pred[valid].long()
    target_valid = target[valid].long()
    out_of_range = (
        (pred_valid < 0) | (pred_valid >= num_classes) | (target_valid < 0) | (target_valid >= num_classes)
    )
    if bool(out_of_range.any()):
        raise ConfigError(
            f"labels outside 0..{num_classes - 1} (and not the ignore label {ignore_index}); "
            "expected the model's classes. Fix: check num_classes against the dataset's class names"
        )
    # Row = reference class, column = predicted class.
    joint = torch.bincount(target_valid * num_classes + pred_valid, minlength=num_classes * num_classes)
    matrix = joint.reshape(num_classes, num_classes)
    tp = matrix.diagonal()
    fp = matrix.sum(0) - tp
    fn = matrix.sum(1) - tp
    return torch.stack([tp, fp, fn], dim=1).to(torch.int64)


class SegmentationCounts:
    """Accumulates ``confusion_counts`` over the batches of one evaluation, on one device, without syncing ranks."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, len(COUNT_NAMES), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Sets every count back to 0 (before the next evaluation)."""
        self.counts.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds the counts of one batch of predicted labels ``pred`` against ``target``."""
        batch = confusion_counts(pred, target, self.num_classes, self.ignore_index)
        self.counts += batch.to(self.counts.device)

    def all_reduced(
        self, group: dist.ProcessGroup | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """The counts summed over every rank of ``group`` (a collective: every rank must call it once)."""
        return all_reduce_counts(self.counts, group=group, device=device)

    def dice(self) -> list[float]:
        """Per-class Dice of this rank's counts only (see ``all_reduced`` for the whole validation set)."""
        return dice_from_counts(self.counts)


def all_reduce_counts(
    counts: torch.Tensor, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Sums int64 counts over the ranks of ``group``; returns a new tensor on ``counts``' device.

    Args:
        counts: this rank's ``(K, 3)`` counts.
        group: process group; ``None`` is the default group. Without an initialised process group
            (a single process) the counts are returned as they are (copied).
        device: where the reduction runs. NCCL only reduces CUDA tensors: ``None`` takes ``counts``' device,
            or the current CUDA device when the backend is NCCL and the counts are on the CPU.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return counts.clone()
    if device is None:
        device = counts.device
        if dist.get_backend(group) == "nccl" and counts.device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    # to(..., copy=True) so the caller's tensor is never reduced in place.
    work = counts.to(device=device, dtype=torch.int64, copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(counts.device)


def dice_from_counts(counts: torch.Tensor | Sequence[Sequence[int]]) -> list[float]:
    """Per-class Dice ``2 tp / (2 tp + fp + fn)``; NaN for a class absent from prediction and reference."""
    table = torch.as_tensor(counts).detach().to("cpu", torch.float64)
    if table.dim() != 2 or table.shape[1] != len(COUNT_NAMES):
        raise ConfigError(f"counts of shape {tuple(table.shape)}; expected (num_classes, 3) [tp, fp, fn]")
    dice = []
    for tp, fp, fn in table.tolist():
        denominator = 2.0 * tp + fp + fn
        dice.append(2.0 * tp / denominator if denominator > 0 else math.nan)
    return dice


def mean_foreground_dice(dice: Sequence[float], include_background: bool = False) -> float:
    """Mean Dice over the foreground classes (index >= 1), NaN classes left out; NaN if none is defined."""
    classes = list(dice) if include_background else list(dice)[1:]
    defined = [d for d in classes if not math.isnan(d)]
    return sum(defined) / len(defined) if defined else math.nan
