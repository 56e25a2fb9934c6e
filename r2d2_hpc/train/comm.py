"""Communication measured, not fitted: a DDP comm hook that times each bucket's all-reduce, and DDP's own numbers.

:class:`CommTimer` is installed with :func:`install_comm_timer`. Its hook is DDP's default all-reduce
(``default_hooks.allreduce_hook``: divide by the world size, all-reduce, the same arithmetic as without a hook)
wrapped by two clock marks: when DDP hands the bucket over (its gradients are ready) and when the all-reduce has
finished. On CPU (gloo) the second mark is taken in the future's callback, which runs when the work completes. On
CUDA (NCCL) both marks are CUDA events; the callback runs after the future's stream has waited for the work, so
its event is recorded behind the all-reduce on the GPU timeline (not yet checked on a GPU in this project).

:func:`ddp_logging_fields` reads what DDP measures by itself on its sampled iterations
(``_get_ddp_logging_data()``: the backward pass's compute, communication and their overlap, in nanoseconds),
for the timing log's ``comm`` lines.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

# The fields of DDP's logging data a ``comm`` line keeps (nanoseconds, of DDP's last sampled iteration and their
# running averages), and the bucket layout.
DDP_FIELDS = (
    "avg_forward_compute_time",
    "avg_backward_compute_time",
    "avg_backward_comm_time",
    "avg_backward_compute_comm_overlap_time",
    "forward_compute_time",
    "backward_compute_time",
    "backward_comm_time",
    "backward_compute_comm_overlap_time",
    "bucket_sizes",
    "num_buckets_reduced",
    "backend_name",
    "comm_hook",
)


class CommTimer:
    """Collects (bucket ready, bucket reduced) clock marks of the current step; thread-safe (gloo's callbacks
    run on its own threads)."""

    def __init__(self, clock: Any, process_group: dist.ProcessGroup | None = None) -> None:
        self.clock = clock
        self.process_group = process_group
        self._lock = threading.Lock()
        self._open: dict[int, Any] = {}
        self._done: list[tuple[Any, Any]] = []
        self.bucket_bytes: list[int] = []

    def clear(self) -> None:
        """Forgets marks from outside a step (there should be none)."""
        with self._lock:
            self._open.clear()
            self._done.clear()

    def take(self) -> list[tuple[Any, Any]]:
        """The step's (ready, reduced) marks, in completion order; resets for the next step."""
        with self._lock:
            done, self._done = self._done, []
            self._open.clear()
        return done

    def hook(self, state, bucket):  # no annotations: DDP rejects the postponed (string) ones
        """A DDP comm hook: the default all-reduce of ``bucket`` (a ``dist.GradBucket``), timed; returns its
        future."""
        ready = self.clock.mark()
        index = bucket.index()
        with self._lock:
            self._open[index] = ready
            if len(self.bucket_bytes) <= index:
                self.bucket_bytes.extend([0] * (index + 1 - len(self.bucket_bytes)))
            buffer = bucket.buffer()
            self.bucket_bytes[index] = buffer.numel() * buffer.element_size()
        future = default_hooks.allreduce_hook(self.process_group or dist.group.WORLD, bucket)

        def reduced(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            mark = self.clock.mark()
            with self._lock:
                self._done.append((self._open.pop(index, ready), mark))
            return fut.value()

        return future.then(reduced)


def install_comm_timer(ddp: torch.nn.parallel.DistributedDataParallel, clock: Any) -> CommTimer:
    """Registers a :class:`CommTimer`'s hook on ``ddp`` (before its first forward pass) and returns the timer."""
    timer = CommTimer(clock, ddp.process_group)
    ddp.register_comm_hook(None, timer.hook)
    return timer


def ddp_logging_fields(ddp: torch.nn.parallel.DistributedDataParallel) -> dict[str, Any]:
    """DDP's own measurements (see :data:`DDP_FIELDS`); an empty dict when this torch does not provide them."""
    try:
        data = ddp._get_ddp_logging_data()
    except (AttributeError, RuntimeError):
        return {}
    return {key: data[key] for key in DDP_FIELDS if key in data}
