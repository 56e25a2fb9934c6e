"""The step timer: books each optimizer step's wall time to data wait, compute, exposed communication and other.

A step is a row of marks on one clock; the time between two marks is booked to what happened between them:

    start --other--> (batch asked for) --data wait--> (batch here) --compute--> ... --other--> end

``other`` is the step's bookkeeping outside the model: ``zero_grad`` before the first batch, the scheduler and
the loss accumulation after the optimizer. The all-reduce DDP runs during the backward pass is timed by a
:class:`~r2d2_hpc.train.comm.CommTimer`; the part of it that the backward pass did not hide (``exposed_comm_s``)
lies inside the last compute interval and is moved out of compute, so the parts still add up to ``step_s``.

Clocks: on CPU the marks are ``time.perf_counter`` readings. On CUDA they are CUDA events recorded on the current
stream, so the intervals are GPU-timeline intervals (a data wait the GPU did not notice because it was still busy
with earlier work books as zero), and nothing blocks the host until the timer resolves its pending steps: once
every ``sync_every_steps`` steps, with one ``event.synchronize()`` (and before an evaluation, a checkpoint or the
end, through :meth:`StepTimer.resolve`). The loss is summed on the device and read at the same moment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from r2d2_hpc.train.comm import CommTimer

DATA, COMPUTE, OTHER = "data_wait_s", "compute_s", "other_s"


class CpuClock:
    """Marks are ``perf_counter`` seconds."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        return float(b - a)

    def synchronize(self, last: Any) -> None:
        """Nothing to wait for on the CPU: every mark is already a time."""


class CudaClock:
    """Marks are CUDA events on the current stream; read only after :meth:`synchronize` (never on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0  # milliseconds

    def synchronize(self, last: Any) -> None:
        last.synchronize()  # every earlier event on the stream is complete too


def clock_for(device: torch.device) -> CpuClock | CudaClock:
    """The clock of ``device``: CUDA events on a GPU, ``perf_counter`` elsewhere."""
    return CudaClock(device) if torch.device(device).type == "cuda" else CpuClock()


@dataclass
class StepTimes:
    """One resolved step, as the timing log writes it; the four parts add up to ``step_s``."""

    step: int
    epoch: int
    data_wait_s: float
    compute_s: float
    exposed_comm_s: float
    comm_s: float
    other_s: float
    step_s: float
    loss: float
    lr: float
    num_buckets: int = 0

    def booked_s(self) -> float:
        return self.data_wait_s + self.compute_s + self.exposed_comm_s + self.other_s


@dataclass
class _Pending:
    step: int
    epoch: int
    lr: float
    loss: torch.Tensor
    marks: list[tuple[str, Any]]  # (what the interval ending at this mark was, mark); the first is the start
    comm: list[tuple[Any, Any]] = field(default_factory=list)  # (bucket ready, bucket reduced)


class StepTimer:
    """Marks the parts of each step and resolves them once per ``sync_every_steps`` steps (one host sync).

    Per step: ``start()``; ``data_asked()`` / ``data_ready()`` around each ``next(batches)``; ``compute_done()``
    after the micro-batch's backward (or the optimizer step); ``lap(step, epoch, loss, lr)`` at its end, which
    returns the steps resolved now (usually none, else the last ``sync_every_steps`` of them).

    Args:
        device: where the step runs (its clock: CUDA events or ``perf_counter``).
        sync_every_steps: resolve (and on CUDA synchronise) once every this many steps.
        comm: the all-reduce timer of the DDP model, or None (one rank: no communication).
    """

    def __init__(
        self, device: torch.device, sync_every_steps: int = 1, comm: CommTimer | None = None
    ) -> None:
        if sync_every_steps < 1:
            raise ValueError(f"sync_every_steps={sync_every_steps} must be at least 1")
        self.clock = clock_for(torch.device(device))
        self.sync_every_steps = sync_every_steps
        self.comm = comm
        self.num_syncs = 0  # host synchronisations so far (one per resolve with pending steps)
        self._pending: list[_Pending] = []
        self._marks: list[tuple[str, Any]] = []

    def start(self) -> None:
        """The step's clock starts (after the previous step's stop check and any evaluation or checkpoint)."""
        self._marks = [("start", self.clock.mark())]
        if self.comm is not None:
            self.comm.clear()

    def data_asked(self) -> None:
        """The loop is about to wait for a batch: the time since the last mark was step bookkeeping."""
        self._marks.append((OTHER, self.clock.mark()))

    def data_ready(self) -> None:
        """A batch is here: the time since :meth:`data_asked` was spent waiting for data."""
        self._marks.append((DATA, self.clock.mark()))

    def compute_done(self) -> None:
        """The forward/backward (or optimizer) work queued since the last mark is done."""
        self._marks.append((COMPUTE, self.clock.mark()))

    def lap(self, step: int, epoch: int, loss: torch.Tensor, lr: float) -> list[StepTimes]:
        """Ends the step (the time since the last mark is ``other``); returns the steps resolved now."""
        self._marks.append((OTHER, self.clock.mark()))
        comm = self.comm.take() if self.comm is not None else []
        self._pending.append(_Pending(step, epoch, lr, loss.detach(), self._marks, comm))
        self._marks = []
        if len(self._pending) >= self.sync_every_steps:
            return self.resolve()
        return []

    def resolve(self) -> list[StepTimes]:
        """Synchronises once and returns every pending step (call before an evaluation, checkpoint or the end)."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        self.clock.synchronize(pending[-1].marks[-1][1])
        self.num_syncs += 1
        losses = torch.stack([p.loss.float().reshape(()) for p in pending]).tolist()  # one copy for all
        return [self._book(p, loss) for p, loss in zip(pending, losses, strict=True)]

    def _book(self, pending: _Pending, loss: float) -> StepTimes:
        seconds = self.clock.seconds
        start = pending.marks[0][1]
        parts = {DATA: 0.0, COMPUTE: 0.0, OTHER: 0.0}
        last_compute_end, last_compute_s = 0.0, 0.0
        previous = start
        for kind, mark in pending.marks[1:]:
            interval = max(0.0, seconds(previous, mark))
            parts[kind] += interval
            if kind == COMPUTE:
                last_compute_end, last_compute_s = seconds(start, mark), interval
            previous = mark
        step_s = max(0.0, seconds(start, pending.marks[-1][1]))
        intervals = [(seconds(start, a), seconds(start, b)) for a, b in pending.comm]
        comm_s = _union_s(intervals)
        # exposed: after the last bucket was ready, until the all-reduces were done and backward returned; it is
        # inside the last compute interval, so it moves from compute to communication (capped by that interval)
        last_ready = max((a for a, _ in intervals), default=last_compute_end)
        last_done = max((b for _, b in intervals), default=last_ready)
        exposed = (
            min(max(0.0, min(last_done, last_compute_end) - last_ready), last_compute_s) if intervals else 0.0
        )
        return StepTimes(
            step=pending.step,
            epoch=pending.epoch,
            data_wait_s=parts[DATA],
            compute_s=parts[COMPUTE] - exposed,
            exposed_comm_s=exposed,
            comm_s=comm_s,
            other_s=parts[OTHER],
            step_s=step_s,
            loss=loss,
            lr=pending.lr,
            num_buckets=len(intervals),
        )


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlapping all-reduces are counted once)."""
    total, reach = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= reach:
            continue
        total += b - max(a, reach)
        reach = b
    return total
