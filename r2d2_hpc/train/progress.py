"""Progress of a training run on rank 0: a tqdm bar at a terminal, else a log line every N steps."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("r2d2_hpc.train.loop")


class Progress:
    """A tqdm bar on rank 0 at a terminal; without one, a log line every ``log_every_steps`` steps and at the end.

    Args:
        total: the run's last step.
        start: the step the bar starts at (a resumed run's checkpoint step).
        enabled: False on every rank but 0.
        log_every_steps: a log line every this many steps when there is no bar; 0 logs only the last step.
    """

    def __init__(self, total: int, start: int, enabled: bool, log_every_steps: int) -> None:
        self.bar = None
        self.enabled = enabled
        self.total = total
        self.log_every_steps = log_every_steps
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step")

    def due(self, step: int) -> bool:
        """Whether ``step`` gets a log line (when there is no bar)."""
        every = self.log_every_steps
        return step == self.total or (every > 0 and step % every == 0)

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif self.enabled and self.due(step):
            log.info("step %d/%d loss %.4f lr %.3e", step, self.total, loss, lr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
