"""Divergence: a NaN or infinite loss or gradient, counted over consecutive steps, and the message that stops a run.

The check costs no extra host synchronisation: :meth:`NonFiniteGuard.push` keeps each step's flag on the device,
and :meth:`NonFiniteGuard.resolve` reads the pending flags in one copy when the step timer resolves its steps (once
every ``train.timing_sync_every_steps``, where the loss is read anyway). The decision to stop travels with the stop
flag through the agreement that already exists (:class:`~r2d2_hpc.train.stop.StopAgreement`), so every rank stops
at the same step even when only one rank saw the non-finite value.

With the fp16 grad scaler, non-finite gradients are the scaler's business: it skips that step and lowers its scale,
which is normal and does not count. Only a non-finite loss counts then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from r2d2_hpc.config import TrainConfig
from r2d2_hpc.errors import R2D2Error, problem
from r2d2_hpc.train.schedule import warmup_steps_for


class DivergedError(R2D2Error):
    """Training stopped because the loss or the gradients stayed NaN or infinite."""


class NonFiniteGuard:
    """Counts consecutive optimizer steps whose loss (or gradient norm) is NaN or infinite."""

    def __init__(self, max_bad_steps: int, check_grads: bool) -> None:
        """``check_grads``: count a non-finite gradient norm too (False with the fp16 grad scaler)."""
        self.max_bad_steps = int(max_bad_steps)
        self.check_grads = check_grads
        self.streak = 0  # consecutive bad steps up to the last observed one
        self.first_bad_step: int | None = None  # first step of the current streak
        self.first_bad_lr: float | None = None  # the learning rate of that step
        self._pending: list[tuple[int, torch.Tensor, float]] = []

    def flag(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """1.0 where this step is bad, else 0.0: a float tensor on the loss' device, nothing is read back."""
        bad = ~torch.isfinite(loss.detach().float())
        if self.check_grads and grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float().to(bad.device))
        return bad.float()

    def push(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, lr: float) -> None:
        """Keeps ``step``'s flag (see :meth:`flag`) on the device until :meth:`resolve`."""
        self._pending.append((step, self.flag(loss, grad_norm), lr))

    def resolve(self) -> None:
        """Reads every pending flag in one copy (call it where the device was synchronised anyway)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([f.reshape(()) for _, f, _ in pending]).tolist()
        for (step, _, lr), bad in zip(pending, flags, strict=True):
            self.observe(step, bool(bad), lr)

    def observe(self, step: int, bad: bool, lr: float) -> None:
        """Records whether ``step`` (taken at learning rate ``lr``) was bad: the flag read back by the loop."""
        if bad:
            if self.streak == 0:
                self.first_bad_step, self.first_bad_lr = step, lr
            self.streak += 1
        else:
            self.streak, self.first_bad_step, self.first_bad_lr = 0, None, None

    @property
    def exhausted(self) -> bool:
        """``max_bad_steps`` consecutive bad steps: this rank wants the run to stop as diverged."""
        return self.streak >= self.max_bad_steps

    @property
    def weights_suspect(self) -> bool:
        """The last step was bad: its update may have made the weights non-finite; do not checkpoint them."""
        return self.streak > 0


@dataclass(frozen=True)
class DivergenceReport:
    """What the message of a diverged run names."""

    step: int
    first_bad_step: int | None
    num_bad_steps: int
    lr: float
    lr_peak: float
    global_batch: int
    last_checkpoint: Path | None
    last_checkpoint_step: int | None


def diverged_reason(tc: TrainConfig, report: DivergenceReport) -> str:
    """One line for ``result.json`` and the report: the steps, the LR, its rule and the global batch."""
    first = report.first_bad_step if report.first_bad_step is not None else report.step
    what = "loss" if tc.amp == "fp16" else "loss or gradient norm"
    return (
        f"training diverged at step {report.step}: the {what} was NaN or infinite for "
        f"{report.num_bad_steps} consecutive step(s) from step {first} at lr {report.lr:.3g} "
        f"(train.max_nonfinite_steps={tc.max_nonfinite_steps}; "
        f"peak lr {report.lr_peak:.3g} = train.lr {tc.lr:g} with train.lr_scaling={tc.lr_scaling} for global "
        f"batch {report.global_batch}, reference batch {tc.lr_reference_batch}; "
        f"warm-up {warmup_steps_for(tc, report.global_batch)} steps)"
    )


def diverged_message(run_dir: Path, tc: TrainConfig, report: DivergenceReport) -> str:
    """The message of a diverged run: where, the LR and its rule, the global batch, what was kept, what to try."""
    found = diverged_reason(tc, report)
    if report.last_checkpoint is not None:
        kept = (
            f"the last good checkpoint {report.last_checkpoint} (step {report.last_checkpoint_step}) is kept: "
            "no checkpoint is written from non-finite weights"
        )
        again = "then run again with resume=auto to continue from that checkpoint with the new settings"
    else:
        kept = "no checkpoint was written before the divergence"
        again = "then run again"
    other_rule = "sqrt" if tc.lr_scaling == "linear" else "none" if tc.lr_scaling == "sqrt" else None
    tries = [f"lower train.lr (e.g. {tc.lr / 10:g})"]
    warmup_now = warmup_steps_for(tc, report.global_batch)
    if warmup_now < max(1, tc.max_steps // 10):
        tries.append(f"a warm-up (e.g. train.warmup_steps={max(1, tc.max_steps // 10)})")
    elif 2 * warmup_now < tc.max_steps // 2:
        tries.append(f"a longer warm-up (e.g. train.warmup_steps={2 * warmup_now})")
    if other_rule:
        tries.append(f"another LR rule (train.lr_scaling={other_rule})")
    if tc.grad_clip is None:
        tries.append("gradient clipping (e.g. train.grad_clip=12)")
    fix = f"{kept}; try {', or '.join(tries)}; {again}"
    return problem(run_dir, found, "finite losses and gradients", fix)
