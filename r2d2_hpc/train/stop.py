"""Stopping at a step boundary: a local flag (set by a signal handler) and the agreement of every rank on it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from r2d2_hpc.train.dist import DistEnv


class StopFlag:
    """Set by a signal handler (preemption, timeout): every rank stops at the next agreed step boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class StopAgreement:
    """Every ``every_steps`` steps, all ranks MAX-reduce their local flags and stop together if any is set.

    The flag is a CPU tensor reduced over a gloo group (the one :func:`~r2d2_hpc.train.dist.init_process_group` returns), so agreeing
    never waits for the GPU; between agreements no rank communicates about stopping at all.
    """

    def __init__(
        self,
        flag: StopFlag,
        env: DistEnv,
        every_steps: int,
        group: dist.ProcessGroup | None = None,
        diverged: Callable[[], bool] | None = None,
    ) -> None:
        """``diverged``: this rank's verdict that training diverged (it travels in the same all-reduce)."""
        if every_steps < 1:
            raise ValueError(f"train.stop_check_every_steps={every_steps} must be at least 1")
        self.flag, self.env, self.every_steps, self.group = flag, env, every_steps, group
        self.diverged = diverged or (lambda: False)
        self.num_agreements = 0
        self.reason: str | None = None  # after a True: "diverged" (any rank) or "preempted"

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank's flag was set before a check at that step."""
        if step % self.every_steps:
            return False
        self.num_agreements += 1
        local = torch.tensor([1 if self.flag.is_set() else 0, 1 if self.diverged() else 0], dtype=torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        stop, diverged = local.tolist()
        self.reason = "diverged" if diverged else "preempted" if stop else None
        return self.reason is not None
