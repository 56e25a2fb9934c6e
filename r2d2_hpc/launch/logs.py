"""The stdout/stderr files of a study's runs, printed whole or followed as they grow.

submitit jobs (``launcher=local`` and ``slurm``) write ``jobs/<job id>_<rank>_log.out`` and ``.err`` per rank;
sbatch jobs write ``sbatch/<run>-<job id>.out`` and ``.err`` for all ranks together, where each training log line
carries ``[rank R]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from r2d2_hpc.launch.outcome import submitit_paths
from r2d2_hpc.launch.record import Study, StudyRun


def run_job_id(run: StudyRun) -> str | None:
    """The run's current job, else the last one it had before a resume."""
    if run.job_id:
        return run.job_id
    previous = run.extra.get("previous_jobs") or []
    return previous[-1]["job_id"] if previous else None


def log_files(study: Study, run: StudyRun, rank: int | None = None) -> list[Path]:
    """The run's log files (those of rank ``rank`` only, where ranks have their own); may not exist yet."""
    job_id = run_job_id(run)
    if not job_id:
        return []
    if study.meta.get("launcher") == "sbatch":
        return [study.dir / "sbatch" / f"{run.name}-{job_id}.{ext}" for ext in ("out", "err")]
    ranks = range(run.world_size) if rank is None else [rank]
    files = []
    for r in ranks:
        paths = submitit_paths(study.dir / "jobs", job_id, r)
        files += [paths.stdout, paths.stderr]
    return files


def _keep(line: str, rank: int | None, shared: bool) -> bool:
    return rank is None or not shared or f"[rank {rank}]" in line


def print_logs(
    study: Study,
    runs: list[StudyRun],
    out: IO[str],
    rank: int | None = None,
    follow: Callable[[], bool] | None = None,
    poll_s: float = 1.0,
) -> int:
    """Prints the runs' logs; with ``follow`` (returns True while to go on) prints what is added too.

    Returns the number of files found.
    """
    shared = study.meta.get("launcher") == "sbatch"
    offsets: dict[Path, int] = {}
    files = [(run, path) for run in runs for path in log_files(study, run, rank)]
    if rank is not None and any(rank >= run.world_size for run in runs):
        raise ValueError(f"--rank {rank}: the run has ranks 0-{max(r.world_size for r in runs) - 1}")
    last_header: Path | None = None

    def emit(path: Path) -> bool:
        nonlocal last_header
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                fh.seek(offsets.get(path, 0))
                text = fh.read()
                offsets[path] = fh.tell()
        except OSError:
            return False
        if not text:
            return True
        # only whole lines: a line still being written comes with the next read
        if not text.endswith("\n") and follow is not None:
            cut = text.rfind("\n") + 1
            offsets[path] -= len(text.encode("utf-8")) - len(text[:cut].encode("utf-8"))
            text = text[:cut]
        lines = [ln for ln in text.splitlines(keepends=True) if _keep(ln, rank, shared)]
        if lines:
            if last_header != path:
                out.write(f"==> {path} <==\n")
                last_header = path
            out.writelines(lines)
            out.flush()
        return True

    found = sum(emit(path) for _, path in files)
    while follow is not None and follow():
        time.sleep(poll_s)
        files = [(run, path) for run in runs for path in log_files(study, run, rank)]  # a resubmitted job
        for _, path in files:
            emit(path)
    if follow is not None:
        for _, path in files:
            emit(path)
    return found
