"""Per-rank timing logs ``timing/rank{R}.jsonl`` (schema 1) and the step timer that fills them.

Each line is one JSON object with a ``type``:

- ``header``: who and what ran (see :func:`run_header`); a resumed run appends a new header whose
  ``resumed_at_step`` is the checkpoint's step, so steps after it may appear twice (the later lines win).
- ``step``: step, epoch, data_wait_s, compute_s, exposed_comm_s, comm_s, other_s, step_s, samples (global
  batch), loss, lr, time (unix s). The booked parts data_wait_s + compute_s + exposed_comm_s + other_s add up to
  step_s; comm_s is the time any all-reduce was in flight (mostly hidden behind the backward pass). Logs written
  before these three fields existed lack them (still schema 1: a reader treats them as not measured).
- ``comm``: step, bucket_bytes, ddp (DDP's own logging data, nanoseconds) every ``timing_sample_every_steps``.
- ``loader``: step, epoch, restart_s: the DataLoader's restart at an epoch start (booked to no step).
- ``eval``: step, epoch, dice_per_class, wall_s (since the run started), plus any extra fields.
- ``end``: step, time, load_avg_1m, plus any extra fields (status, a weights hash), when this rank stops.

The header and ``result.json`` of a training run are built here too (:func:`training_header`, :func:`run_result`).

Non-finite floats (a NaN loss, the Dice of an absent class) are written as ``null`` so every line is strict JSON.
Lines are buffered and written every ~1 s or 50 lines, so logging costs a step nothing noticeable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from r2d2_hpc.atomic import disk_guard, write_json
from r2d2_hpc.config import TrainConfig
from r2d2_hpc.errors import R2D2Error, problem
from r2d2_hpc.train.dist import DistEnv
from r2d2_hpc.train.machine import (
    cpu_facts,
    device_name,
    device_peak,
    git_sha,
    machine_load,
    software_versions,
)
from r2d2_hpc.train.metrics import mean_foreground_dice
from r2d2_hpc.train.schedule import warmup_steps_for

SCHEMA = 1
TRAIN_DISK_FIX = "run again with resume=auto: it continues from the last complete checkpoint"
FLUSH_EVERY_S = 1.0
FLUSH_EVERY_LINES = 50


class TimingLog:
    """An append-only JSONL log of one rank; see the module docstring for the line types."""

    def __init__(self, path: Path, header: dict[str, Any], append: bool) -> None:
        """Opens ``path`` and writes ``header`` at once.

        Args:
            path: the log file; its folder is created.
            header: the header line (usually :func:`run_header`); ``type`` and ``schema`` are set here.
            append: keep earlier lines (resume); a cut last line (kill -9 mid-write) is truncated away first.
        """
        self.path = Path(path)
        with self._disk_guard():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append and self.path.exists():
                _drop_cut_line(self.path)
            self._fh = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - see close()
        self._buffer: list[str] = []
        self._last_flush_s = time.monotonic()
        self._write({"resumed_at_step": None, **header, "type": "header", "schema": SCHEMA})
        self.flush()

    def step(
        self,
        step: int,
        epoch: int,
        data_wait_s: float,
        compute_s: float,
        step_s: float,
        samples: int,
        loss: float,
        lr: float,
        *,
        exposed_comm_s: float = 0.0,
        comm_s: float = 0.0,
        other_s: float = 0.0,
    ) -> None:
        """One optimizer step; data wait, compute, exposed communication and other add up to ``step_s``."""
        self._write(
            {
                "type": "step",
                "step": int(step),
                "epoch": int(epoch),
                "data_wait_s": data_wait_s,
                "compute_s": compute_s,
                "exposed_comm_s": exposed_comm_s,
                "comm_s": comm_s,
                "other_s": other_s,
                "step_s": step_s,
                "samples": int(samples),
                "loss": loss,
                "lr": lr,
                "time": round(time.time(), 3),
            }
        )

    def evaluation(
        self, step: int, epoch: int, dice_per_class: list[float], wall_s: float, **extra: Any
    ) -> None:
        """One validation pass (Dice per class, wall-clock seconds since the run started)."""
        self._write(
            {
                "type": "eval",
                "step": int(step),
                "epoch": int(epoch),
                "dice_per_class": [float(d) for d in dice_per_class],
                "wall_s": wall_s,
                **extra,
            }
        )

    def end(self, step: int, **extra: Any) -> None:
        """The run stopped on this rank (completed or preempted), e.g. with ``status`` and ``weights_sha256``;
        the machine's load average now is recorded too (the honesty checks compare it with the header's)."""
        self._write(
            {"type": "end", "step": int(step), "time": round(time.time(), 3), **machine_load(), **extra}
        )

    def comm(self, step: int, bucket_bytes: list[int], ddp: dict[str, Any]) -> None:
        """A sampled step's communication: the bucket sizes the comm hook saw and DDP's own numbers (ns)."""
        self._write({"type": "comm", "step": int(step), "bucket_bytes": list(bucket_bytes), "ddp": ddp})

    def loader_restart(self, step: int, epoch: int, seconds: float) -> None:
        """The DataLoader restarted for ``epoch`` before ``step`` (iterator, workers, first batch): not a data
        wait of any step."""
        self._write({"type": "loader", "step": int(step), "epoch": int(epoch), "restart_s": seconds})

    def _write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise ValueError(f"{self.path}: the timing log is closed")
        self._buffer.append(json.dumps(_finite(record), allow_nan=False, default=str) + "\n")
        if len(self._buffer) >= FLUSH_EVERY_LINES or time.monotonic() - self._last_flush_s >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered lines to the file (the OS writes them to disk in its own time)."""
        if self._fh is not None and self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()  # a failed write is not retried: the log keeps its complete lines only
            with self._disk_guard():
                self._fh.write(text)
                self._fh.flush()
        self._last_flush_s = time.monotonic()

    def close(self) -> None:
        """Flushes and closes; idempotent (the file is closed even when the last write fails)."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with self._disk_guard(), fh:
                if self._buffer:
                    fh.write("".join(self._buffer))
                    self._buffer.clear()

    def _disk_guard(self) -> contextlib.AbstractContextManager[None]:
        what = f"the timing log {self.path.name}"
        return disk_guard(self.path.parent, what, TRAIN_DISK_FIX)

    def __enter__(self) -> TimingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _drop_cut_line(path: Path) -> None:
    """Truncates the file after its last newline: a line cut by a kill is dropped, complete lines are kept."""
    with open(path, "rb+") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            fh.seek(start)
            chunk = fh.read(pos - start)
            if start + len(chunk) == end and chunk.endswith(b"\n"):
                return
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                fh.truncate(start + cut + 1)
                return
            pos = start
        fh.truncate(0)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Reads a JSONL log; a cut last line (no newline, not valid JSON) is dropped, a bad line elsewhere raises."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the last piece has no newline: a write cut short
                break
            raise R2D2Error(
                problem(
                    path,
                    f"line {number} is not JSON ({exc.msg})",
                    "one JSON object per line",
                    "delete the damaged line (the log is append-only)",
                )
            ) from exc
    return records


def run_header(
    env: DistEnv,
    run_id: str,
    model: str,
    batch_per_rank: int,
    global_batch: int,
    scaling: str,
    lr_rule: str,
    amp: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The header line of a rank's timing log: the run, the job, the hardware and the software."""
    return {
        "type": "header",
        "schema": SCHEMA,
        "run_id": run_id,
        "slurm_job_id": env.job_id,
        "nodes": env.num_nodes,
        "world_size": env.world_size,
        "rank": env.rank,
        "local_rank": env.local_rank,
        "local_world_size": env.local_world_size,
        "source": env.source,
        "backend": env.backend,
        "host": socket.gethostname(),
        "device": env.device,
        "device_name": device_name(env.device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git_sha": git_sha(),
        "model": model,
        "batch_per_rank": batch_per_rank,
        "global_batch": global_batch,
        "scaling": scaling,
        "lr_rule": lr_rule,
        "amp": amp,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **cpu_facts(),
        **machine_load(),
        **software_versions(),
        **(extra or {}),
    }


def training_header(
    env: DistEnv,
    run_id: str,
    tc: TrainConfig,
    model_info: dict[str, Any],
    global_batch: int,
    lr_peak: float,
    num_samples: tuple[int, int],
    resumed_at_step: int | None,
) -> dict[str, Any]:
    """:func:`run_header` of a training run: the model, its batch split, the schedule and the data sizes.

    Args:
        num_samples: (training samples, validation samples).
        resumed_at_step: the checkpoint's step when the run resumed, else None.
    """
    micro = tc.micro_batch(env.world_size)
    extra = {
        "resumed_at_step": resumed_at_step,
        "max_steps": tc.max_steps,
        "micro_batch": micro,
        "grad_accum": tc.grad_accum,
        "lr_peak": lr_peak,
        "warmup_steps": warmup_steps_for(tc, global_batch),
        "spatial_dims": model_info["spatial_dims"],
        "num_params": model_info["num_params"],
        "flops_per_sample": model_info["flops_per_sample"],
        "grad_bytes": model_info["num_params"] * 4,
        "dataset": model_info["dataset"],
        "train_samples": num_samples[0],
        "val_samples": num_samples[1],
        **device_peak(env.device, device_name(env.device), tc.amp),
    }
    return run_header(
        env,
        run_id,
        model_info["name"],
        micro * tc.grad_accum,
        global_batch,
        tc.scaling,
        tc.lr_scaling,
        tc.amp,
        extra,
    )


@dataclass
class Throughput:
    """Running sums over the steps after the warm-up: what ``result.json`` reports, without re-reading the log."""

    warmup_steps: int
    step_s: float = 0.0
    data_wait_s: float = 0.0
    samples: int = 0

    def add(self, step: int, data_wait_s: float, step_s: float, samples: int) -> None:
        """Counts optimizer step ``step`` (1-based) unless it is one of the first ``warmup_steps``."""
        if step > self.warmup_steps:
            self.step_s += step_s
            self.data_wait_s += data_wait_s
            self.samples += samples

    def samples_per_s(self) -> float | None:
        return self.samples / self.step_s if self.step_s > 0 else None

    def data_wait_share(self) -> float | None:
        return self.data_wait_s / self.step_s if self.step_s > 0 else None


def run_result(
    status: str,
    run_id: str,
    env: DistEnv,
    tc: TrainConfig,
    model_info: dict[str, Any],
    steps: int,
    throughput: Throughput,
    dice_per_class: list[float],
    class_names: list[str],
    wall_s: float,
) -> dict[str, Any]:
    """The run's ``result.json`` (the same dict on every rank but for peak memory and wall time)."""
    mean_fg = mean_foreground_dice(dice_per_class) if dice_per_class else math.nan
    return {
        "status": status,
        "run_id": run_id,
        "model": model_info["name"],
        "world_size": env.world_size,
        "num_nodes": env.num_nodes,
        "scaling": tc.scaling,
        "global_batch": tc.effective_global_batch(env.world_size),
        "steps": steps,
        "max_steps": tc.max_steps,
        "throughput_samples_per_s": throughput.samples_per_s(),
        "timing_warmup_steps": tc.timing_warmup_steps,
        "warmup_steps": warmup_steps_for(tc, tc.effective_global_batch(env.world_size)),
        "data_wait_share": throughput.data_wait_share(),
        "dice_per_class": dice_per_class,
        "mean_foreground_dice": mean_fg if math.isfinite(mean_fg) else None,
        "class_names": class_names,
        "peak_memory_gib": peak_memory_gib(torch.device(env.device)),
        "wall_s": wall_s,
        "num_params": model_info["num_params"],
        "flops_per_sample": model_info["flops_per_sample"],
        "device": env.device,
        "backend": env.backend,
    }


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """Writes ``run_dir/result.json`` atomically (a temporary name, then a rename)."""
    path = Path(run_dir) / "result.json"
    return write_json(path, result, "the run's result (result.json)", TRAIN_DISK_FIX, indent=2)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device``, or this process' peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
