"""Writes synthetic run directories in the exact formats r2d2_hpc.train writes (timing.py, loop.py), with
step times chosen by the test, so every expected figure can be computed by hand."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

T0 = 1_700_000_000.0  # unix time of the first start


def header(rank: int, world_size: int, **fields: Any) -> dict[str, Any]:
    """A schema-1 header line as ``TimingLog`` writes it (``resumed_at_step`` first, then run_header's keys)."""
    base = {
        "resumed_at_step": None,
        "type": "header",
        "schema": 1,
        "run_id": "run",
        "slurm_job_id": None,
        "nodes": 1,
        "world_size": world_size,
        "rank": rank,
        "local_rank": rank,
        "local_world_size": world_size,
        "source": "torchrun",
        "backend": "gloo",
        "host": "node0",
        "device": "cpu",
        "device_name": "test CPU",
        "model": "unet",
        "batch_per_rank": 4,
        "global_batch": 4 * world_size,
        "scaling": "strong",
        "lr_rule": "none",
        "amp": "none",
        "started_at": datetime.fromtimestamp(T0, UTC).isoformat(timespec="seconds"),
        "max_steps": 20,
        "grad_bytes": 4_000_000,
        "num_params": 1_000_000,
    }
    base.update(fields)
    return base


def step_line(step: int, step_s: float, data_wait_s: float, samples: int, t: float, loss: float = 1.0) -> str:
    """A step line with the writer's key order."""
    record = {
        "type": "step",
        "step": step,
        "epoch": 0,
        "data_wait_s": data_wait_s,
        "compute_s": step_s - data_wait_s,
        "step_s": step_s,
        "samples": samples,
        "loss": loss,
        "lr": 0.01,
        "time": round(t, 3),
    }
    return json.dumps(record)


def write_run(
    root: Path,
    name: str,
    *,
    world_size: int = 1,
    nodes: int = 1,
    model: str = "unet",
    scaling: str = "strong",
    global_batch: int = 16,
    batch_per_rank: int | None = None,
    num_steps: int = 10,
    step_s: float | Callable[[int], float] = 0.1,
    data_wait_s: float = 0.01,
    evals: Sequence[tuple[int, float, list[float]]] = (),
    status: str | None = "completed",
    warmup_steps: int = 0,
    grad_bytes: int = 4_000_000,
    resume: tuple[int, int] | None = None,
    resume_gap_s: float = 100.0,
    slurm: dict[str, Any] | None = None,
    train_samples: int | None = None,
    seed: int | None = None,
) -> Path:
    """A run directory with every rank's timing log, config.json, result.json (and slurm.json when given).

    ``step_s`` is the time of every step (or a function of the step number); ``evals`` are (step, wall_s since
    the segment started, dice_per_class), written by every rank when its segment runs that step.
    ``status=None`` leaves out the end line and result.json (a killed run). ``resume=(stopped_after,
    checkpoint_step)``: a first segment runs steps 1..stopped_after and stops without an end line, a second
    starts ``resume_gap_s`` later from the checkpoint and runs checkpoint_step+1..num_steps (re-done steps: the
    later lines win).
    """
    run = root / name
    (run / "timing").mkdir(parents=True)
    if batch_per_rank is None:
        batch_per_rank = global_batch // world_size if scaling == "strong" else 4
    gb = global_batch if scaling == "strong" else batch_per_rank * world_size
    seconds = step_s if callable(step_s) else (lambda _s: step_s)
    fields = dict(
        nodes=nodes,
        model=model,
        scaling=scaling,
        batch_per_rank=batch_per_rank,
        global_batch=gb,
        max_steps=num_steps,
        grad_bytes=grad_bytes,
        run_id=name,
    )
    if train_samples is not None:
        fields["train_samples"] = train_samples
    segments = (
        [(1, num_steps, None)]
        if resume is None
        else [(1, resume[0], None), (resume[1] + 1, num_steps, resume[1])]
    )
    for rank in range(world_size):
        lines, start = [], T0
        for index, (first, last, resumed_at) in enumerate(segments):
            started = datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds")
            lines.append(
                json.dumps(header(rank, world_size, **fields, resumed_at_step=resumed_at, started_at=started))
            )
            t = start
            for s in range(first, last + 1):
                t += seconds(s)
                lines.append(step_line(s, seconds(s), data_wait_s, gb, t, loss=1.0 / s))
                lines += [
                    json.dumps(
                        {"type": "eval", "step": s, "epoch": 0, "dice_per_class": dice, "wall_s": wall_s}
                    )
                    for e_step, wall_s, dice in evals
                    if e_step == s
                ]
            if index == len(segments) - 1 and status is not None:
                lines.append(
                    json.dumps({"type": "end", "step": last, "time": round(t + 1, 3), "status": status})
                )
            start = float(int(t) + 1 + resume_gap_s)  # whole seconds: started_at has no fraction
        (run / "timing" / f"rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    config = {"model": {"name": model}, "train": {"scaling": scaling, "timing_warmup_steps": warmup_steps}}
    if seed is not None:
        config["train"]["seed"] = seed
    (run / "config.json").write_text(json.dumps(config))
    if status is not None:
        last_dice = evals[-1][2] if evals else []
        res = {
            "status": status,
            "run_id": name,
            "model": model,
            "world_size": world_size,
            "num_nodes": nodes,
            "scaling": scaling,
            "global_batch": gb,
            "steps": num_steps,
            "dice_per_class": last_dice,
            "class_names": ["background", "a", "b"][: len(last_dice)],
            "peak_memory_gib": 1.5,
            "wall_s": 50.0,
            "device": "cpu",
        }
        (run / "result.json").write_text(json.dumps(res))
    if slurm is not None:
        (run / "slurm.json").write_text(json.dumps(slurm))
    return run
