"""Segmentation losses: soft Dice + cross-entropy, and its deep-supervision sum.

Both terms are computed in float32 whatever the logits' dtype, so the loss is safe under AMP (bf16/fp16).
Voxels labelled ``IGNORE_INDEX`` (padding) contribute to neither term: setting their logits to anything gives
the same loss and a zero gradient there.

The Dice term is nnU-Net's *batch Dice*: per class, true positives, predicted mass and reference mass are summed
over the whole micro-batch and all voxels before the ratio is taken, so a slice without a class does not get a
Dice of 0 or 1 of its own. With the default ``smooth=1e-5``, a class absent from the reference of the whole
micro-batch gets a Dice near 0 unless its predicted mass is near 0 too, which pushes false positives down.

Under data parallelism, ``over_ranks=True`` sums those three statistics over every rank of the process group
before the ratio is taken (as nnU-Net does under DDP), and divides each rank's cross-entropy sum by the batch's
mean valid-voxel count per rank, so the loss of a global batch (averaged over ranks, as DDP averages gradients)
is the same however it is split over ranks. The gradient is exact: every rank computes the same Dice from the same sums, so the gradient
reaching each rank's own statistics is the common upstream gradient times the number of ranks, and DDP's
gradient average over ranks then gives the gradient of the whole batch's loss (see ``_SumOverRanks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from r2d2_hpc.data.augment import IGNORE_INDEX
from r2d2_hpc.errors import ConfigError


class DiceCELoss(nn.Module):
    """``ce_weight * cross-entropy + dice_weight * (1 - mean soft batch Dice)``.

    Args:
        num_classes: classes including background (the model's output channels).
        dice_weight: weight of the soft Dice loss (0 disables its gradient; it is still reported by ``parts``).
        ce_weight: weight of the cross-entropy (same remark).
        ignore_index: label of voxels that count in neither term.
        smooth: added to numerator and denominator of each class's Dice.
        include_background: whether class 0 takes part in the Dice mean (cross-entropy always includes it).
        over_ranks: sum the batch-Dice statistics over the ranks of the default process group (when one is
            initialised with more than one rank), so the loss does not depend on how the batch is split.
    """

    def __init__(
        self,
        num_classes: int,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        smooth: float = 1e-5,
        include_background: bool = False,
        over_ranks: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(
                f"num_classes={num_classes}: a segmentation loss needs at least 2 classes "
                "(background and one structure); check the dataset's class names"
            )
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ConfigError(
                f"train.dice_weight={dice_weight} and train.ce_weight={ce_weight} must be >= 0 "
                "and not both 0; set at least one of them to a positive value"
            )
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"ignore_index={ignore_index} is one of the {num_classes} classes; "
                f"use a label outside 0..{num_classes - 1} (the default is {IGNORE_INDEX})"
            )
        self.num_classes = num_classes
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        self.include_background = include_background
        self.over_ranks = over_ranks

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted loss, a float32 scalar with a gradient.

        Args:
            logits: ``(N, K, *spatial)`` raw scores, any floating dtype.
            target: ``(N, *spatial)`` integer labels in ``0..K-1`` or ``ignore_index``.
        """
        return self.parts(logits, target)["loss"]

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and its two terms, each a float32 scalar tensor (still attached to the graph).

        Returns:
            ``{"loss": weighted sum, "ce": cross-entropy, "dice": 1 - mean Dice}``; call ``.detach()`` (or
            ``.item()`` at a logging step only, since it synchronises with the GPU) before logging.
        """
        self._check(logits, target)
        logits = logits.float()
        target = target.long()
        valid = target != self.ignore_index
        # Ignored voxels get class 0 here, and are then masked out of both terms.
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        ce_sum, ce_count = self._cross_entropy_sum(logits, safe_target, valid)
        stats = self._dice_stats(logits, safe_target, valid)
        if self._synced():
            # One all-reduce: the Dice statistics and the number of valid voxels of the whole batch.
            packed = _SumOverRanks.apply(torch.cat([stats.flatten(), ce_count.detach().view(1)]))
            stats = packed[:-1].view_as(stats)
            # The local sum over the batch's mean voxel count per rank: averaged over ranks (as DDP averages
            # gradients), this is the cross-entropy of the whole batch, whatever the padding on each rank.
            ce_count = packed[-1].detach() / dist.get_world_size()
        ce = ce_sum / ce_count.clamp_min(1.0)  # a batch of padding only gives 0 instead of NaN
        dice = self._dice_loss(stats)
        loss = self.ce_weight * ce + self.dice_weight * dice
        return {"loss": loss, "ce": ce, "dice": dice}

    def _synced(self) -> bool:
        return self.over_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.dim() < 3 or logits.shape[1] != self.num_classes:
            raise ConfigError(
                f"logits of shape {tuple(logits.shape)}; expected (N, {self.num_classes}, *spatial). "
                "Fix: build the model with out channels = the dataset's number of classes"
            )
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ConfigError(
                f"target of shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
                "expected (N, *spatial) labels on the logits' grid"
            )
        if target.is_floating_point() or target.is_complex():
            raise ConfigError(f"target of dtype {target.dtype}; expected integer labels (uint8 or int64)")

    def _cross_entropy_sum(
        self, logits: torch.Tensor, safe_target: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy summed over valid voxels, and their number."""
        # reduction="none": the CUDA mean/sum reductions use atomicAdd and fail under deterministic mode.
        per_voxel = F.cross_entropy(logits, safe_target, reduction="none")
        mask = valid.to(per_voxel.dtype)
        return (per_voxel * mask).sum(), mask.sum()

    def _dice_stats(
        self, logits: torch.Tensor, safe_target: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """``(3, K)``: per class, true positives, predicted mass and reference mass over the batch."""
        mask = valid.unsqueeze(1).to(logits.dtype)
        probs = torch.softmax(logits, dim=1) * mask
        one_hot = torch.zeros_like(probs).scatter_(1, safe_target.unsqueeze(1), 1.0) * mask
        reduce_dims = [0, *range(2, logits.dim())]
        return torch.stack(
            [(probs * one_hot).sum(reduce_dims), probs.sum(reduce_dims), one_hot.sum(reduce_dims)]
        )

    def _dice_loss(self, stats: torch.Tensor) -> torch.Tensor:
        intersection, pred_mass, ref_mass = stats
        dice = (2.0 * intersection + self.smooth) / (pred_mass + ref_mass + self.smooth).clamp_min(1e-8)
        if not self.include_background:
            dice = dice[1:]
        return 1.0 - dice.mean()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank statistics whose every rank computes the same loss from the sums.

    Backward returns the upstream gradient times the world size: the true gradient of the common loss with
    respect to this rank's statistics is the sum of the identical upstream gradients of all ranks. No collective
    runs in backward, so DDP's bucket all-reduces are the only ones there.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, stats: torch.Tensor) -> torch.Tensor:
        total = stats.detach().clone()
        dist.all_reduce(total)
        ctx.world_size = dist.get_world_size()  # type: ignore[attr-defined]
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad * ctx.world_size  # type: ignore[attr-defined]


def downsample_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of integer labels ``(N, *spatial)`` to ``size``; labels stay labels.

    Nearest never mixes values, so ``IGNORE_INDEX`` survives as itself (exact in float32, like every label
    below 2**24). Returns ``target`` itself when the size already matches.
    """
    if tuple(target.shape[1:]) == tuple(size):
        return target
    resized = F.interpolate(target.unsqueeze(1).float(), size=tuple(size), mode="nearest")
    return resized.squeeze(1).to(target.dtype)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's default weights ``1 / 2**i`` (full resolution first), normalised to sum to 1."""
    raw = [0.5**i for i in range(num_outputs)]
    total = sum(raw)
    return [w / total for w in raw]


def deep_supervision_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    outputs: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``loss_fn`` over the outputs ``[full-res, 1/2-res, ...]``, each against a resized target.

    Args:
        loss_fn: e.g. a ``DiceCELoss``.
        outputs: one logits tensor (plain loss) or the deep-supervision list, full resolution first.
        target: ``(N, *spatial)`` labels at full resolution; resized (nearest) to each output's grid.
        weights: one per output, used as given; ``None`` takes ``deep_supervision_weights``.
    """
    total = None
    for weight, output, level_target in _levels(outputs, target, weights):
        term = weight * loss_fn(output, level_target)
        total = term if total is None else total + term
    assert total is not None  # _levels refuses an empty list
    return total


def deep_supervision_parts(
    loss_fn: DiceCELoss,
    outputs: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Like ``deep_supervision_loss``, but returns the weighted ``loss``, ``ce`` and ``dice`` separately."""
    totals: dict[str, torch.Tensor] = {}
    for weight, output, level_target in _levels(outputs, target, weights):
        for key, value in loss_fn.parts(output, level_target).items():
            totals[key] = weight * value if key not in totals else totals[key] + weight * value
    return totals


def _levels(
    outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor, weights: Sequence[float] | None
) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    if not outputs:
        raise ConfigError("deep supervision got no outputs; expected the model's list of logits tensors")
    weights = deep_supervision_weights(len(outputs)) if weights is None else list(weights)
    if len(weights) != len(outputs):
        raise ConfigError(
            f"{len(weights)} deep-supervision weights for {len(outputs)} outputs; "
            "give one weight per output (or None for the default 1/2**i)"
        )
    return [
        (float(w), out, downsample_target(target, out.shape[2:]))
        for w, out in zip(weights, outputs, strict=True)
    ]
