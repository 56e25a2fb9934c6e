"""Tests of learning-rate scaling, warmup and decay schedules, and the optimizer builder."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from r2d2_hpc.config import TrainConfig
from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train.schedule import (
    build_optimizer,
    build_scheduler,
    build_scheduler_from_config,
    lr_factor,
    scaled_lr,
    warmup_steps_for,
)


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, num_steps: int) -> list[float]:
    """The lr used by each of the next ``num_steps`` optimizer steps."""
    out = []
    for _ in range(num_steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_scaled_lr_for_each_rule() -> None:
    assert scaled_lr(0.01, "none", 64, 16) == pytest.approx(0.01)
    assert scaled_lr(0.01, "linear", 64, 16) == pytest.approx(0.04)
    assert scaled_lr(0.01, "sqrt", 64, 16) == pytest.approx(0.02)
    assert scaled_lr(0.01, "linear", 8, 16) == pytest.approx(0.005)
    assert scaled_lr(0.01, "sqrt", 16, 16) == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="Valid choices are: none, linear, sqrt"):
        scaled_lr(0.01, "cubic", 64, 16)
    with pytest.raises(ConfigError, match="at least 1"):
        scaled_lr(0.01, "linear", 0, 16)


def test_warmup_rises_linearly_to_the_peak() -> None:
    scheduler = build_scheduler(_optimizer(0.1), "constant", max_steps=40, warmup_steps=10)
    lrs = _lrs(scheduler, 12)
    assert lrs[0] == pytest.approx(0.1 / 11)  # about 0, never exactly 0
    assert lrs[5] == pytest.approx(0.1 * 6 / 11)  # half-way
    assert lrs[10] == pytest.approx(0.1)  # the peak at step warmup_steps
    assert lrs[11] == pytest.approx(0.1)
    assert all(b > a for a, b in itertools.pairwise(lrs[:11]))


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_decay_endpoints(schedule: str) -> None:
    kwargs = {"schedule": schedule, "max_steps": 100, "warmup_steps": 20, "poly_power": 0.9}
    assert lr_factor(20, **kwargs) == pytest.approx(1.0)
    assert lr_factor(100, **kwargs) == pytest.approx(0.0)
    assert lr_factor(150, **kwargs) == pytest.approx(0.0)  # past the end it stays at the floor
    assert lr_factor(100, min_lr_ratio=0.1, **kwargs) == pytest.approx(0.1)
    half = 0.5**0.9 if schedule == "poly" else 0.5
    assert lr_factor(60, **kwargs) == pytest.approx(half)
    assert lr_factor(60, min_lr_ratio=0.2, **kwargs) == pytest.approx(0.2 + 0.8 * half)
    lrs = _lrs(build_scheduler(_optimizer(0.5), schedule, 100, 20, min_lr_ratio=0.1), 100)
    assert lrs[20] == pytest.approx(0.5)
    assert lrs[99] > 0.05 and lrs[99] == pytest.approx(0.5 * lr_factor(99, min_lr_ratio=0.1, **kwargs))
    assert all(b <= a for a, b in itertools.pairwise(lrs[20:]))
    short = build_scheduler(_optimizer(0.5), schedule, 10, 0, min_lr_ratio=0.1)
    _lrs(short, 10)
    assert short.get_last_lr()[0] == pytest.approx(0.05)  # the floor once max_steps steps are done


def test_poly_without_warmup_matches_nnunet_formula() -> None:
    lrs = _lrs(build_scheduler(_optimizer(0.01), "poly", max_steps=50, warmup_steps=0), 50)
    assert lrs == pytest.approx([0.01 * (1 - s / 50) ** 0.9 for s in range(50)])


def test_scheduler_state_dict_round_trip_continues_identically() -> None:
    cfg = TrainConfig(momentum=0.9)

    def build() -> torch.optim.lr_scheduler.LambdaLR:
        optimizer = build_optimizer(torch.nn.Linear(3, 2).parameters(), cfg, 0.1)
        return build_scheduler(optimizer, "cosine", 30, 5, min_lr_ratio=0.05)

    expected = _lrs(build(), 30)
    first = build()
    before = _lrs(first, 12)
    buffer = io.BytesIO()
    torch.save({"optimizer": first.optimizer.state_dict(), "scheduler": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = build()  # a fresh optimizer and scheduler, as after a restart
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert resumed.last_epoch == 12
    assert resumed.get_last_lr() == pytest.approx([expected[12]])
    after = _lrs(resumed, 18)
    assert before + after == pytest.approx(expected, rel=1e-12)


def test_bad_schedule_settings_raise() -> None:
    with pytest.raises(ConfigError, match="Valid choices are"):
        build_scheduler(_optimizer(), "step", 10, 0)
    with pytest.raises(ConfigError, match="shorten the warmup"):
        build_scheduler(_optimizer(), "poly", 10, 10)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        build_scheduler(_optimizer(), "poly", 10, 0, min_lr_ratio=1.5)


def test_build_optimizer_sgd_and_adamw() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(params, TrainConfig(optimizer="sgd", momentum=0.95, weight_decay=1e-4), 0.02)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.02,
        0.95,
        True,
        1e-4,
    )
    plain = build_optimizer(params, TrainConfig(optimizer="sgd", momentum=0.0), 0.02)
    assert plain.param_groups[0]["nesterov"] is False
    adamw = build_optimizer(
        params, TrainConfig(optimizer="adamw", betas=[0.8, 0.99], weight_decay=0.05), 1e-3
    )
    assert isinstance(adamw, torch.optim.AdamW)
    group = adamw.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.8, 0.99), 0.05)
    with pytest.raises(ConfigError, match="betas"):
        build_optimizer(params, TrainConfig(optimizer="adamw", betas=[0.9]), 1e-3)
    with pytest.raises(ConfigError, match="positive"):
        build_optimizer(params, TrainConfig(), 0.0)
    assert math.isclose(sgd.param_groups[0]["lr"], 0.02)


def test_default_warmup_follows_the_lr_rule() -> None:
    def warmup(rule: str, global_batch: int, **kw) -> int:
        return warmup_steps_for(
            TrainConfig(lr_scaling=rule, max_steps=200, lr_reference_batch=16, **kw), global_batch
        )

    # A rule that raises the lr warms up: 10% of max_steps for linear, 5% for sqrt.
    assert warmup("linear", 64) == 20 and warmup("sqrt", 64) == 10
    # No rule, or a rule that does not raise the lr (batch at or below the reference): no warm-up.
    assert warmup("none", 64) == 0 and warmup("linear", 16) == 0 and warmup("sqrt", 8) == 0
    # An explicit setting wins, 0 included.
    assert warmup("linear", 64, warmup_steps=0) == 0 and warmup("none", 64, warmup_steps=7) == 7
    # The scheduler built from the config uses it: the first step runs at 1/21 of the peak.
    cfg = TrainConfig(lr_scaling="linear", max_steps=200, lr_reference_batch=16, schedule="constant")
    lrs = _lrs(build_scheduler_from_config(_optimizer(0.4), cfg, global_batch=64), 22)
    assert (
        lrs[0] == pytest.approx(0.4 / 21)
        and lrs[19] == pytest.approx(0.4 * 20 / 21)
        and lrs[21] == pytest.approx(0.4)
    )
