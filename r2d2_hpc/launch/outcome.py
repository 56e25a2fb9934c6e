"""How a job that has ended went, from its files alone (no scheduler call).

A submitit job (``launcher=local`` or ``slurm``) leaves one ``<job id>_<rank>_result.pkl`` per rank in the
study's ``jobs/`` folder: ``("success", result)`` or ``("error", traceback)``. An sbatch job leaves the run's
``result.json``. Either tells COMPLETED, PREEMPTED (stopped at a step boundary, resumable), DIVERGED or FAILED.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT_STATES = {"completed": "COMPLETED", "preempted": "PREEMPTED"}


def submitit_paths(jobs_dir: Path, job_id: str, rank: int) -> Any:
    """submitit's file paths (stdout, stderr, result pickle) of one rank of a job."""
    from submitit.core.utils import JobPaths

    return JobPaths(jobs_dir, job_id, rank)


def submitit_outcome(jobs_dir: Path, job_id: str, world_size: int) -> tuple[str, str | None] | None:
    """(state, error) from the result pickles of every rank; None while no rank has left one."""
    from submitit.core.utils import pickle_load

    found: list[tuple[str, Any]] = []
    for rank in range(world_size):
        path = submitit_paths(jobs_dir, job_id, rank).result_pickle
        if not path.is_file():
            continue
        try:
            found.append(pickle_load(path))
        except Exception as exc:  # a pickle cut by a kill, or one written by another submitit version
            found.append(("error", f"{path}: unreadable result ({type(exc).__name__}: {exc})"))
    if not found:
        return None
    errors = [str(value) for kind, value in found if kind == "error"]
    if errors:
        return "FAILED", errors[0].strip()[-3000:]
    statuses = {value.get("status") for _, value in found if isinstance(value, dict)}
    if len(found) < world_size:
        return None  # some ranks are still writing theirs
    return ("PREEMPTED" if "preempted" in statuses else "COMPLETED"), None


def diverged_outcome(run_dir: Path) -> tuple[str, str | None] | None:
    """("DIVERGED", its message) when the run's ``result.json`` says training diverged, else None.

    A diverged run exits non-zero on every rank (it is no measurement), so the scheduler calls it FAILED; its
    ``result.json`` tells the difference, and the report lists it with its reason.
    """
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("status") != "diverged":
        return None
    return "DIVERGED", str(result.get("error") or result.get("reason") or "training diverged")


def result_json_outcome(run_dir: Path) -> tuple[str, str | None] | None:
    """(state, None) from the run's ``result.json``; None when there is none (the run never finished)."""
    path = run_dir / "result.json"
    try:
        status = json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None
    if status == "diverged":
        return diverged_outcome(run_dir)
    state = RESULT_STATES.get(status)
    return (state, None) if state else ("FAILED", f"{path}: status {status!r}")
