"""The step timer: splits each optimizer step into data wait and compute."""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Splits each step into data wait and compute; synchronises CUDA before every clock read.

    Call ``data_ready()`` when a batch has arrived and ``compute_done()`` when its work is finished (once per
    micro-batch with gradient accumulation; the parts add up), then ``lap()`` at the end of the step. Call
    ``reset()`` after work that belongs to no step (evaluation, a checkpoint) so it is not counted as data wait.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.reset()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset(self) -> None:
        """Starts a new step now, forgetting what was measured since the last lap."""
        self._start = self._mark = self._now()
        self._data_wait_s = self._compute_s = 0.0

    def data_ready(self) -> None:
        """A batch is here: the time since the last mark was spent waiting for data."""
        now = self._now()
        self._data_wait_s += now - self._mark
        self._mark = now

    def compute_done(self) -> None:
        """The batch's forward/backward/optimizer work has finished on the device."""
        now = self._now()
        self._compute_s += now - self._mark
        self._mark = now

    def lap(self) -> tuple[float, float, float]:
        """Ends the step; returns ``(data_wait_s, compute_s, step_s)`` and starts the next step."""
        now = self._now()
        result = (self._data_wait_s, self._compute_s, now - self._start)
        self._start = self._mark = now
        self._data_wait_s = self._compute_s = 0.0
        return result
