"""Elastic resume: refused unless allowed, and then the LR schedule follows the new world size's peak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r2d2_hpc.config import TrainConfig
from r2d2_hpc.train.checkpoint import CheckpointError, TrainingParts
from r2d2_hpc.train.dist import DistEnv
from r2d2_hpc.train.resume import check_world_size, rescale_lr
from r2d2_hpc.train.schedule import build_optimizer, build_scheduler_from_config, scaled_lr

# Weak scaling with the linear rule: 8 ranks x 2 samples = 16 -> peak 0.04, 32 ranks -> 64 -> peak 0.16.
TC = TrainConfig(
    scaling="weak", batch_per_rank=2, lr=0.01, lr_scaling="linear", lr_reference_batch=4, max_steps=20
)


def _env(world: int) -> DistEnv:
    return DistEnv(0, world, 0, world, "127.0.0.1", 1, 1, "gloo", "cpu", "torchrun", None)


def _parts(world: int) -> tuple[TrainingParts, float]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    batch = TC.effective_global_batch(world)
    peak = scaled_lr(TC.lr, TC.lr_scaling, batch, TC.lr_reference_batch)
    optimizer = build_optimizer(model.parameters(), TC, peak)
    return TrainingParts(model, optimizer, build_scheduler_from_config(optimizer, TC, batch), None), peak


def _factor(step: int) -> float:
    """The schedule's multiplier at ``step`` (the same at either world size: the warm-up follows the rule)."""
    return build_scheduler_from_config(_parts(32)[0].optimizer, TC, 64).lr_lambdas[0](step)


def test_a_world_size_change_is_refused_unless_allowed() -> None:
    state = {"world_size": 8, "step": 5}
    assert check_world_size(state, Path("ckpt/last.pt"), _env(8), allowed=False) is False
    with pytest.raises(CheckpointError) as info:
        check_world_size(state, Path("ckpt/last.pt"), _env(32), allowed=False)
    message = str(info.value)
    assert "written by 8 rank(s), this run has 32" in message
    assert "resume with 8 rank(s)" in message and "train.allow_world_size_change=true" in message
    assert check_world_size(state, Path("ckpt/last.pt"), _env(32), allowed=True) is True


def test_resumed_on_32_ranks_the_schedule_follows_the_new_peak() -> None:
    """The issue's case: 8 ranks resumed on 32 kept peak 0.04 while the header said 0.16."""
    old, old_peak = _parts(8)
    for _ in range(5):
        old.optimizer.step()
        old.scheduler.step()
    saved = {"optimizer": old.optimizer.state_dict(), "scheduler": old.scheduler.state_dict()}
    new, new_peak = _parts(32)
    assert (old_peak, new_peak) == pytest.approx((0.04, 0.16))
    new.optimizer.load_state_dict(saved["optimizer"])
    new.scheduler.load_state_dict(saved["scheduler"])
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.04 * _factor(5))  # the old peak came back
    rescale_lr(new, new_peak)
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.16 * _factor(5))
    assert new.scheduler.get_last_lr() == pytest.approx([0.16 * _factor(5)])
    new.optimizer.step()
    new.scheduler.step()
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.16 * _factor(6))
    assert new.scheduler.last_epoch == 6
