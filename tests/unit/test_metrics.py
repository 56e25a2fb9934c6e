"""Tests of the confusion counts, their all-reduce and Dice from counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r2d2_hpc.data.augment import IGNORE_INDEX
from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train.metrics import (
    SegmentationCounts,
    all_reduce_counts,
    confusion_counts,
    dice_from_counts,
    mean_foreground_dice,
)
from r2d2_hpc.train.sampler import ShardedEvalSampler


def test_confusion_counts_on_a_hand_example() -> None:
    target = torch.tensor([[0, 0, 1, 1, 2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2, 2, 1]])  # the last two voxels are ignored whatever they predict
    counts = confusion_counts(pred, target, num_classes=3)
    assert counts.dtype == torch.int64
    # class 0: tp at voxel 0, fp at voxel 4, fn at voxel 1; class 1: tp 2, fp 1; class 2: tp 1, fn 1.
    assert counts.tolist() == [[1, 1, 1], [2, 1, 0], [1, 0, 1]]
    dice = dice_from_counts(counts)
    assert dice == pytest.approx([2 / 4, 4 / 5, 2 / 3])
    assert mean_foreground_dice(dice) == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert mean_foreground_dice(dice, include_background=True) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    target = torch.tensor([[0, 1, 1, 0]])
    pred = torch.tensor([[0, 1, 0, 0]])
    dice = dice_from_counts(confusion_counts(pred, target, num_classes=4))
    assert dice[0] == pytest.approx(4 / 5) and dice[1] == pytest.approx(2 / 3)
    assert math.isnan(dice[2]) and math.isnan(dice[3])
    assert mean_foreground_dice(dice) == pytest.approx(2 / 3)
    assert math.isnan(mean_foreground_dice([0.9, math.nan, math.nan]))
    # A class that is predicted but absent from the reference is a defined 0, not NaN.
    assert dice_from_counts([[0, 3, 0]]) == [0.0]


def test_counts_of_shards_sum_to_the_counts_of_the_whole() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (7, 5, 6))
    target[:, :, 5] = IGNORE_INDEX
    pred = torch.randint(0, 3, (7, 5, 6))
    whole = confusion_counts(pred, target, 3)
    assert int(whole.sum(0)[0] + whole.sum(0)[2]) == 7 * 5 * 5  # every valid voxel is a tp or an fn once
    for world_size in (1, 2, 3):
        total = torch.zeros(3, 3, dtype=torch.int64)
        for rank in range(world_size):
            rank_counts = SegmentationCounts(3)
            for index in ShardedEvalSampler(7, world_size, rank):  # one sample per batch
                rank_counts.update(pred[index : index + 1], target[index : index + 1])
            total += rank_counts.counts
        assert torch.equal(total, whole)
        assert dice_from_counts(total) == dice_from_counts(whole)


def test_segmentation_counts_reset_and_errors() -> None:
    counts = SegmentationCounts(2)
    counts.update(torch.tensor([[1, 1]]), torch.tensor([[1, 0]]))
    assert counts.counts.tolist() == [[0, 0, 1], [1, 1, 0]]
    assert counts.dice() == pytest.approx([0.0, 2 / 3])
    assert torch.equal(counts.all_reduced(), counts.counts)  # no process group: a copy of the local counts
    counts.reset()
    assert counts.counts.sum().item() == 0
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        confusion_counts(torch.tensor([[2]]), torch.tensor([[1]]), 2)
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        confusion_counts(torch.tensor([[0]]), torch.tensor([[7]]), 2)
    with pytest.raises(ConfigError, match="same"):
        confusion_counts(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), 2)


def _reduce_rank(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        local = torch.tensor([[rank + 1, 10 * rank, 5], [2**40, 0, rank]], dtype=torch.int64)
        reduced = all_reduce_counts(local)
        assert local.tolist()[0][0] == rank + 1  # the input is not reduced in place
        results[rank] = reduced.tolist()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_counts_sums_int64_over_two_gloo_ranks(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_reduce_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        expected = [[3, 10, 10], [2**41, 0, 1]]
        assert results[0] == expected and results[1] == expected
