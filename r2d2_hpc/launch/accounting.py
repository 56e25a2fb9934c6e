"""Slurm accounting of a study's jobs: ``sacct`` rows become ``slurm.json`` beside each run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
from typing import Any

from r2d2_hpc.launch.record import FINISHED, Study


def _sacct_rows(job_id: str, fields: str, wait_s: float) -> list[dict[str, str]]:
    """Every attempt's sacct row (``-D``: a requeued job has one per start), once the last shows a finished state
    (the accounting database lags the controller)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = subprocess.run(
                ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", fields],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return []
        rows = [dict(zip(fields.split(","), line.split("|"), strict=False)) for line in out if line.strip()]
        finished = bool(rows) and rows[-1].get("State", "").split(" ")[0] in FINISHED
        if finished or time.monotonic() > deadline:
            return rows


def _stamp(values: dict[str, str], key: str) -> datetime | None:
    try:
        return datetime.fromisoformat(values[key])
    except (KeyError, ValueError):
        return None


def _int(values: dict[str, str], key: str) -> int | None:
    return int(values[key]) if values.get(key, "").isdigit() else None


def slurm_accounting(job_id: str, wait_s: float = 30.0) -> dict[str, Any] | None:
    """Queue wait, elapsed time and CPU/GPU-hours of a Slurm job from sacct, summed over every attempt (a
    preempted or timed-out job that requeued itself has one row per start in ``sacct -D``); nodes and allocated
    TRES of the last attempt; None when sacct fails or knows no such job."""
    fields = "JobID,State,Submit,Start,End,ElapsedRaw,NNodes,NCPUS,AllocTRES"
    rows = _sacct_rows(job_id, fields, wait_s)
    if not rows:
        return None
    attempts = []
    for values in rows:
        tres = dict(kv.split("=", 1) for kv in values.get("AllocTRES", "").split(",") if "=" in kv)
        submit, start = _stamp(values, "Submit"), _stamp(values, "Start")
        attempts.append(
            {
                "state": values.get("State", "").split(" ")[0],
                "submit": values.get("Submit"),
                "start": values.get("Start"),
                "end": values.get("End"),
                "queue_wait_s": (start - submit).total_seconds() if submit and start else None,
                "elapsed_s": float(values["ElapsedRaw"]) if values.get("ElapsedRaw", "").isdigit() else None,
                "nodes": _int(values, "NNodes"),
                "cpus": _int(values, "NCPUS"),
                "gpus": int(tres.get("gres/gpu", 0) or 0),
                "alloc_tres": values.get("AllocTRES"),
            }
        )
    last = attempts[-1]

    def total(key: str) -> float | None:
        known = [a[key] for a in attempts if a[key] is not None]
        return sum(known) if known else None

    def hours(unit: str) -> float:
        return sum((a["elapsed_s"] or 0.0) * (a[unit] or 0) for a in attempts) / 3600

    return {
        "job_id": rows[-1].get("JobID"),
        "state": last["state"],
        "num_attempts": len(attempts),
        "queue_wait_s": total("queue_wait_s"),  # summed over attempts
        "elapsed_s": total("elapsed_s"),  # summed over attempts
        "cpu_hours": hours("cpus"),
        "gpu_hours": hours("gpus"),
        "nodes": last["nodes"],
        "cpus": last["cpus"],
        "gpus": last["gpus"],
        "alloc_tres": last["alloc_tres"],
        "attempts": attempts,
    }


def store_accounting(study: Study) -> None:
    """Writes ``slurm.json`` beside each Slurm run's logs (the analysis turns it into GPU-hours and queue time)."""
    for run in study.runs:
        if not run.job_id:
            continue
        acct = slurm_accounting(run.job_id)
        if acct is None:
            continue
        run_dir = study.dir / run.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "slurm.json.tmp"
        tmp.write_text(json.dumps(acct, indent=1))
        os.replace(tmp, run_dir / "slurm.json")
