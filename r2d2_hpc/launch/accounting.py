"""Slurm accounting of a study's jobs: ``sacct`` rows become ``slurm.json`` beside each run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
from typing import Any

from r2d2_hpc.launch.record import FINISHED, Study


def _sacct_row(job_id: str, fields: str, wait_s: float) -> dict[str, str] | None:
    """The job's sacct row once it shows a finished state (the accounting database lags the controller)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = (
                subprocess.run(
                    ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                )
                .stdout.strip()
                .splitlines()
            )
        except (OSError, subprocess.SubprocessError):
            return None
        values = dict(zip(fields.split(","), out[-1].split("|"), strict=False)) if out else None
        finished = values is not None and values.get("State", "").split(" ")[0] in FINISHED
        if finished or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def slurm_accounting(job_id: str, wait_s: float = 30.0) -> dict[str, Any] | None:
    """Queue wait, elapsed time, nodes and allocated TRES of a Slurm job from sacct; None when sacct fails."""
    fields = "JobID,State,Submit,Start,End,ElapsedRaw,NNodes,NCPUS,AllocTRES"
    values = _sacct_row(job_id, fields, wait_s)
    if not values:
        return None
    tres = dict(kv.split("=", 1) for kv in values.get("AllocTRES", "").split(",") if "=" in kv)

    def stamp(key: str) -> datetime | None:
        try:
            return datetime.fromisoformat(values[key])
        except (KeyError, ValueError):
            return None

    submit, start = stamp("Submit"), stamp("Start")
    return {
        "job_id": values.get("JobID"),
        "state": values.get("State", "").split()[0],
        "queue_wait_s": (start - submit).total_seconds() if submit and start else None,
        "elapsed_s": float(values["ElapsedRaw"]) if values.get("ElapsedRaw", "").isdigit() else None,
        "nodes": int(values["NNodes"]) if values.get("NNodes", "").isdigit() else None,
        "cpus": int(values["NCPUS"]) if values.get("NCPUS", "").isdigit() else None,
        "gpus": int(tres.get("gres/gpu", 0) or 0),
        "alloc_tres": values.get("AllocTRES"),
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
