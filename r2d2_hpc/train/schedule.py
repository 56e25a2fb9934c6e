"""Learning rate: scaling with the global batch, warmup, decay, and the optimizer that uses it.

The scheduler is a ``LambdaLR`` stepped once per optimizer step. The learning rate of optimizer step ``s``
(counted from 0) is ``peak * lr_factor(s)``:

- warmup (``s < warmup_steps``): ``(s + 1) / (warmup_steps + 1)``, rising linearly from about 0 to 1 at
  ``s == warmup_steps``, so no step runs with a learning rate of exactly 0;
- then, with ``t = (s - warmup_steps) / (max_steps - warmup_steps)`` clamped to [0, 1] and
  ``floor = min_lr_ratio``: poly ``floor + (1 - floor) * (1 - t) ** poly_power``, cosine
  ``floor + (1 - floor) * (1 + cos(pi t)) / 2``, constant ``1``. Poly and cosine reach ``floor`` at ``max_steps``.

``warmup_steps_for`` picks the warm-up: an explicit ``train.warmup_steps``, or by default one that follows the
LR rule. A rule that raises the learning rate above ``train.lr`` (a global batch above
``train.lr_reference_batch``) warms up over a share of ``max_steps`` (``WARMUP_SHARE``: 10% for ``linear``, as
Goyal et al.'s linear rule assumes a gradual warm-up, 5% for the gentler ``sqrt``); ``none``, and a rule that
does not raise the learning rate, start at the peak.

The factor depends on the step only, so a scheduler rebuilt with the same arguments and given a saved
``state_dict`` continues exactly where the saved one stopped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from r2d2_hpc.config import LR_RULES, SCHEDULES, TrainConfig
from r2d2_hpc.errors import ConfigError

# Default warm-up, as a share of max_steps, of each LR rule when it raises the learning rate.
WARMUP_SHARE = {"none": 0.0, "sqrt": 0.05, "linear": 0.1}


def warmup_steps_for(cfg: TrainConfig, global_batch: int) -> int:
    """``train.warmup_steps`` when set, else the warm-up that follows ``train.lr_scaling`` (module doc)."""
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    if scaled_lr(1.0, cfg.lr_scaling, global_batch, cfg.lr_reference_batch) <= 1.0:
        return 0
    return min(cfg.max_steps - 1, math.ceil(WARMUP_SHARE[cfg.lr_scaling] * cfg.max_steps))


def scaled_lr(base_lr: float, rule: str, global_batch: int, reference_batch: int) -> float:
    """The peak learning rate for ``global_batch``, given ``base_lr`` at ``reference_batch``.

    Rules: ``none`` keeps it, ``linear`` multiplies by ``global_batch / reference_batch`` (Goyal et al.),
    ``sqrt`` by its square root (Krizhevsky; Hoffer et al.).
    """
    if rule not in LR_RULES:
        raise ConfigError(
            f"train.lr_scaling={rule!r} is not a valid choice. Valid choices are: {', '.join(LR_RULES)}"
        )
    if global_batch < 1 or reference_batch < 1:
        raise ConfigError(
            f"global batch {global_batch} and train.lr_reference_batch={reference_batch} "
            "must both be at least 1"
        )
    ratio = global_batch / reference_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return float(base_lr)


def lr_factor(
    step: int,
    *,
    schedule: str,
    max_steps: int,
    warmup_steps: int,
    poly_power: float = 0.9,
    min_lr_ratio: float = 0.0,
) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (see the module doc)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / (max_steps - warmup_steps), 0.0), 1.0)
    if schedule == "poly":
        decay = (1.0 - progress) ** poly_power
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    max_steps: int,
    warmup_steps: int = 0,
    poly_power: float = 0.9,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` over every param group of ``optimizer``; call ``step()`` once after each optimizer step.

    The optimizer's current ``lr`` is taken as the peak (build the optimizer with the scaled lr).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"train.schedule={schedule!r} is not a valid choice. Valid choices are: {', '.join(SCHEDULES)}"
        )
    if max_steps < 1 or not 0 <= warmup_steps < max_steps:
        raise ConfigError(
            f"train.max_steps={max_steps} and train.warmup_steps={warmup_steps}: expected "
            "max_steps >= 1 and 0 <= warmup_steps < max_steps; shorten the warmup"
        )
    if not 0.0 <= min_lr_ratio <= 1.0 or poly_power <= 0:
        raise ConfigError(
            f"train.min_lr_ratio={min_lr_ratio} must be in [0, 1] and train.poly_power={poly_power} positive"
        )
    # A partial of a module-level function (not a closure): its state is empty, so state_dict() stays
    # plain data and a checkpoint only carries the step.
    factor = functools.partial(
        lr_factor,
        schedule=schedule,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        poly_power=poly_power,
        min_lr_ratio=min_lr_ratio,
    )
    return LambdaLR(optimizer, lr_lambda=factor)


def build_scheduler_from_config(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, global_batch: int
) -> LambdaLR:
    """``build_scheduler`` with the schedule settings of ``cfg`` and the warm-up of ``warmup_steps_for``."""
    warmup = warmup_steps_for(cfg, global_batch)
    return build_scheduler(optimizer, cfg.schedule, cfg.max_steps, warmup, cfg.poly_power, cfg.min_lr_ratio)


def build_optimizer(params: Iterable[Any], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (L2 weight decay) or AdamW (decoupled weight decay), at peak ``lr``."""
    if lr <= 0:
        raise ConfigError(f"learning rate {lr} must be positive; check train.lr and train.lr_scaling")
    if cfg.optimizer == "sgd":
        # Nesterov needs a positive momentum; momentum 0 is plain SGD.
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
            raise ConfigError(
                f"train.betas={list(cfg.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.999]"
            )
        betas = (float(cfg.betas[0]), float(cfg.betas[1]))
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    raise ConfigError(
        f"train.optimizer={cfg.optimizer!r} is not a valid choice. Valid choices are: sgd, adamw"
    )
