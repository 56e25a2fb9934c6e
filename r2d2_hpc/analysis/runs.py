"""Per-run figures: status, throughput after warm-up, step-time spread, time split, Dice, time to a target, cost.

Throughput is global samples per second over the measured steps: ``sum(samples) / sum(step time)``, where a
step's time is the mean over ranks (ranks wait for each other at the all-reduce, so their step times agree up to
noise). The first ``warmup_steps`` steps after the start and after every resume are left out (compilation,
allocator and cuDNN warm-up); a run shorter than that keeps all steps but the first of each segment, and says so.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from r2d2_hpc.analysis.load import RunLog
from r2d2_hpc.analysis.options import DEFAULT_WARMUP_STEPS

FAILED_STATES = (
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "LOST",
    "INTERRUPTED",
)
TIMING_STATUSES = ("completed", "preempted", "killed")  # runs whose step times count


def run_status(run: RunLog) -> tuple[str, str]:
    """``(status, why)``: completed | preempted | diverged | killed | failed | empty | unreadable | missing."""
    entry_state = str((run.ref.entry or {}).get("state") or "")
    if run.ref.path is None:
        return (
            "missing",
            f"listed in study.json (state {entry_state or 'unknown'}) but its directory is absent",
        )
    if run.unreadable:
        return "unreadable", run.unreadable
    logged = str((run.result or {}).get("status") or (run.end or {}).get("status") or "")
    if logged in ("completed", "preempted"):
        return logged, ""
    if logged == "diverged" or entry_state == "DIVERGED":  # not a valid measurement: left out of scaling
        reason = (run.result or {}).get(
            "reason"
        ) or f"non-finite loss, stopped at step {(run.end or {}).get('step')}"
        return "diverged", str(reason)
    slurm_state = str((run.slurm or {}).get("state") or "")
    failed = [s for s in (slurm_state, entry_state) if s.upper().startswith(FAILED_STATES) or s == "failed"]
    if len(run.steps) == 0:
        return ("failed" if failed else "empty"), "no step was logged" + (
            f" (state {failed[0]})" if failed else ""
        )
    if failed:
        error = str((run.ref.entry or {}).get("error") or "").strip()
        because = f": {error.splitlines()[0][:300]}" if error else ""
        return "failed", f"state {failed[0]} after {int(run.steps['step'].max())} steps{because}"
    return (
        "killed",
        f"no end line after step {int(run.steps['step'].max())}: the run stopped without finishing",
    )


def describe(run: RunLog) -> dict[str, Any]:
    """Who ran what: model, scaling mode (from the logs only), nodes, ranks, batch sizes."""
    h, res, entry = run.header, run.result or {}, run.ref.entry or {}
    cfg_train = (run.config or {}).get("train", {})
    cfg_model = (run.config or {}).get("model", {})
    world_size = _first(h.get("world_size"), res.get("world_size"))
    global_batch = _first(h.get("global_batch"), res.get("global_batch"))
    batch_per_rank = _first(h.get("batch_per_rank"))
    if batch_per_rank is None and global_batch and world_size:
        batch_per_rank = global_batch / world_size
    return {
        "run_id": run.run_id,
        "run_dir": str(run.ref.path) if run.ref.path else str(entry.get("run_dir")),
        "model": _first(h.get("model"), res.get("model"), cfg_model.get("name"), entry.get("model"))
        or "unknown",
        "scaling": _first(h.get("scaling"), res.get("scaling"), cfg_train.get("scaling")) or "unknown",
        "nodes": _first(h.get("nodes"), res.get("num_nodes"), (run.slurm or {}).get("nodes")),
        "world_size": world_size,
        "global_batch": global_batch,
        "batch_per_rank": batch_per_rank,
        "lr_rule": h.get("lr_rule"),
        "amp": h.get("amp"),
        "device": _first(h.get("device"), res.get("device")),
        "device_name": h.get("device_name"),
        "num_params": _first(h.get("num_params"), res.get("num_params")),
        "grad_bytes": _first(h.get("grad_bytes"), (h.get("num_params") or 0) * 4 or None),
        "max_steps": _first(h.get("max_steps"), res.get("max_steps"), cfg_train.get("max_steps")),
    }


def warmup_for(run: RunLog, option: int | None) -> int:
    """The option, else the run's own train.timing_warmup_steps, else the default."""
    if option is not None:
        return option
    cfg = (run.config or {}).get("train", {}).get("timing_warmup_steps")
    return int(_first(cfg, (run.result or {}).get("timing_warmup_steps"), DEFAULT_WARMUP_STEPS))


def measured_steps(run: RunLog, warmup: int) -> tuple[pd.DataFrame, int]:
    """The steps that count for throughput and the warm-up actually applied (shortened for short runs)."""
    steps = run.steps
    starts = np.array([int(h.get("resumed_at_step") or 0) for h in run.headers] or [0])
    seg_start = starts[np.clip(steps["segment"].to_numpy(), 0, len(starts) - 1)]
    for applied in (warmup, min(warmup, 1), 0):
        chosen = steps[steps["step"].to_numpy() > seg_start + applied]
        if len(chosen):
            return chosen, applied
    return chosen, 0


def timing_figures(run: RunLog, warmup: int) -> dict[str, Any]:
    """Throughput, step-time median and p90, time shares and epoch time over the measured steps."""
    chosen, applied = measured_steps(run, warmup)
    out: dict[str, Any] = {"warmup_steps": applied, "measured_steps": len(chosen)}
    total_s = float(chosen["step_s"].sum())
    if not len(chosen) or total_s <= 0:
        return out
    step_s = chosen["step_s"].to_numpy()
    wait_s = float(chosen["data_wait_s"].sum())
    compute_s = float(chosen["compute_s"].sum())
    measured = "exposed_comm_s" in chosen and bool(chosen["exposed_comm_s"].notna().all())
    if measured:  # every part booked on the ranks: nothing is a residual
        exposed_s = float(chosen["exposed_comm_s"].sum())
        other_s = float(chosen["other_s"].sum())
        out.update(exposed_comm_s=exposed_s / len(chosen), comm_s=float(chosen["comm_s"].sum()) / len(chosen))
    else:  # an older log: communication unknown (inside compute), other is what the parts leave
        other_s = max(total_s - wait_s - compute_s, 0.0)
        out.update(exposed_comm_s=math.nan, comm_s=math.nan)
    out.update(
        throughput=float(chosen["samples"].sum()) / total_s,
        step_s_mean=total_s / len(chosen),
        step_s_median=float(np.median(step_s)),
        step_s_p90=float(np.percentile(step_s, 90)),
        slowest_rank_step_s=float(chosen["step_s_max"].mean()) if "step_s_max" in chosen else math.nan,
        data_wait_s=wait_s / len(chosen),
        compute_s=compute_s / len(chosen),
        other_s=other_s / len(chosen),
        measured_comm=measured,
        data_wait_share=wait_s / total_s,
        compute_share=compute_s / total_s,
    )
    spe = steps_per_epoch(run)
    out["steps_per_epoch"] = spe
    out["epoch_time_s"] = spe * out["step_s_mean"] if spe else math.nan
    return out


def steps_per_epoch(run: RunLog) -> int | None:
    """From the header (the sampler's rule: ceil(samples / ranks) // batch per rank), else from the epochs."""
    h = run.header
    n, ws, b = h.get("train_samples"), h.get("world_size"), h.get("batch_per_rank")
    if n and ws and b:
        return max(math.ceil(n / ws) // b, 1)
    counts = run.steps.groupby("epoch")["step"].count()
    inner = counts.iloc[1:-1] if len(counts) > 2 else counts.iloc[:0]
    return int(inner.mode().iloc[0]) if len(inner) else None


def dice_figures(run: RunLog) -> dict[str, Any]:
    """The last evaluation's per-class Dice and their foreground mean."""
    dice = run.evals[-1].get("dice_per_class") if run.evals else (run.result or {}).get("dice_per_class")
    names = (run.result or {}).get("class_names") or []
    if not dice:
        return {"final_dice": math.nan, "dice_per_class": [], "class_names": names}
    return {"final_dice": mean_foreground(dice), "dice_per_class": list(dice), "class_names": names}


def mean_foreground(dice: list[float | None]) -> float:
    """Mean Dice of the classes after the first (background); absent values (null/NaN) are skipped."""
    values = [d for d in (dice[1:] if len(dice) > 1 else dice) if d is not None and d == d]
    return float(np.mean(values)) if values else math.nan


def segment_offsets_s(run: RunLog) -> list[float]:
    """Seconds of earlier segments before each segment starts: a resumed process restarts its wall clock."""
    offsets, total = [], 0.0
    for index, header in enumerate(run.headers or [{}]):
        offsets.append(total)
        total += segment_duration_s(run, index, header)
    return offsets


def segment_duration_s(run: RunLog, index: int, header: dict[str, Any]) -> float:
    """From the header's start time (else the first step's start) to the segment's last step or end line."""
    if index not in run.segment_times:
        return 0.0
    first_step_start, last = run.segment_times[index]
    start = _unix(header.get("started_at"))
    return max(last - (first_step_start if start is None else min(start, first_step_start)), 0.0)


def run_time_s(run: RunLog) -> float:
    """Wall-clock seconds of the whole run over all its segments (result.json's wall_s covers only the last)."""
    if run.headers and run.segment_times:
        return sum(segment_duration_s(run, i, h) for i, h in enumerate(run.headers))
    return float((run.result or {}).get("wall_s") or math.nan)


def time_to_target(run: RunLog, target: float) -> dict[str, Any]:
    """Wall-clock seconds (all segments), step and samples at the first evaluation reaching ``target``."""
    offsets = segment_offsets_s(run)
    for rec in run.evals:
        if mean_foreground(rec.get("dice_per_class") or []) >= target:
            seg = min(int(rec.get("segment", 0)), len(offsets) - 1)
            step = int(rec.get("step", 0))
            done = run.steps[run.steps["step"] <= step]["samples"].sum() if len(run.steps) else math.nan
            return {
                "tta_s": offsets[seg] + float(rec.get("wall_s") or 0.0),
                "tta_step": step,
                "tta_samples": done,
            }
    return {"tta_s": math.nan, "tta_step": math.nan, "tta_samples": math.nan}


def cost_figures(run: RunLog, world_size: int | None, device: str | None) -> dict[str, Any]:
    """Slurm accounting when present (GPU-hours, else CPU-hours), else log time x ranks."""
    slurm = run.slurm or {}
    out: dict[str, Any] = {
        "job_id": slurm.get("job_id") or run.header.get("slurm_job_id"),
        "slurm_state": slurm.get("state"),
        "queue_wait_s": _num(slurm.get("queue_wait_s")),
        "elapsed_s": _num(slurm.get("elapsed_s")),
        "run_time_s": run_time_s(run),
    }
    gpus, cpus = _num(slurm.get("gpus")), _num(slurm.get("cpus"))
    if out["elapsed_s"] == out["elapsed_s"] and (gpus > 0 or cpus > 0):
        units = gpus if gpus > 0 else cpus
        out.update(cost_units=units, cost_unit="GPU-hours" if gpus > 0 else "CPU-hours", cost_source="slurm")
        out["cost_hours"] = out["elapsed_s"] * units / 3600
    else:
        gpu = str(device or "").startswith("cuda")
        rank_s = rank_seconds(run, world_size)
        units = rank_s / out["run_time_s"] if out["run_time_s"] > 0 else float(world_size or math.nan)
        out.update(cost_units=units, cost_unit="GPU-hours" if gpu else "rank-hours", cost_source="logs")
        out["cost_hours"] = rank_s / 3600
    return out


def rank_seconds(run: RunLog, world_size: int | None) -> float:
    """Seconds x ranks over the run, each segment at its own header's world size (an elastic resume)."""
    if not (run.headers and run.segment_times):
        return run_time_s(run) * float(world_size or math.nan)
    return sum(
        segment_duration_s(run, i, h) * float(h.get("world_size") or world_size or math.nan)
        for i, h in enumerate(run.headers)
    )


def run_row(run: RunLog, warmup_option: int | None) -> dict[str, Any]:
    """Every per-run figure except the time to target (that needs the series' target)."""
    row = describe(run)
    row["status"], row["why"] = run_status(run)
    row["steps"] = int(run.steps["step"].max()) if len(run.steps) else 0
    row["segments"] = max(len(run.headers), 1)
    warmup = warmup_for(run, warmup_option)
    row.update(timing_figures(run, warmup))
    if row["measured_steps"] and row["warmup_steps"] < warmup:
        run.problems.append(
            f"too short for a {warmup}-step warm-up: timed after {row['warmup_steps']} step(s)"
        )
    row["problems"] = "; ".join(run.problems)
    row["timing_ok"] = row["status"] in TIMING_STATUSES and row.get("throughput", 0) > 0
    if row["timing_ok"] and row["world_size"]:
        row["throughput_per_rank"] = row["throughput"] / row["world_size"]
    row["peak_memory_gib"] = _num((run.result or {}).get("peak_memory_gib"))
    dice = dice_figures(run)
    row["final_dice"] = dice["final_dice"]
    row.update(cost_figures(run, row["world_size"], row["device"]))
    return row


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _unix(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def loss_curve(run: RunLog, max_points: int = 200) -> pd.DataFrame:
    """Mean training loss against samples seen, averaged into at most ``max_points`` bins (plots stay light)."""
    steps = run.steps
    if not len(steps):
        return pd.DataFrame({"samples_seen": [], "loss": []})
    seen = steps["samples"].cumsum().to_numpy(float)
    bins = np.minimum((np.arange(len(steps)) * max_points) // len(steps), max_points - 1)
    frame = pd.DataFrame({"bin": bins, "samples_seen": seen, "loss": steps["loss"].to_numpy(float)})
    return (
        frame.groupby("bin")
        .agg(samples_seen=("samples_seen", "max"), loss=("loss", "mean"))
        .reset_index(drop=True)
    )
