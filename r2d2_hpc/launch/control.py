"""Cancel and resume a study's runs (``python -m r2d2_hpc.study cancel|resume``).

- cancel: Slurm jobs with one ``scancel`` call (after ``scontrol update Requeue=0``: the SIGTERM it sends makes
  the ranks checkpoint at a step boundary, and the job must not requeue itself); local runs by interrupting their submitit controller (which stops
  its ranks); every cancelled run is marked CANCELLED in ``study.json``. A local launcher still running the study
  sees the marks and starts none of the cancelled runs.
- resume: every run that did not complete (FAILED, CANCELLED, TIMEOUT, PREEMPTED, LOST, never started) is started
  again with its recorded config; ``resume=auto`` continues it from its last checkpoint. Local studies run here
  and now, Slurm studies are resubmitted through submitit, sbatch studies through their scripts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from r2d2_hpc.config import LaunchConfig, to_dataclass
from r2d2_hpc.errors import LaunchError
from r2d2_hpc.launch.record import Study, StudyRun
from r2d2_hpc.launch.status import LOCAL_LAUNCHERS, RunStatus, process_alive, study_status

log = logging.getLogger("r2d2_hpc.launch")
STILL_GOING = {"PLANNED", "SUBMITTED", "PENDING", "REQUEUED", "RUNNING", "CONFIGURING", "COMPLETING"}


def select(study: Study, names: list[str] | None) -> list[StudyRun]:
    """The named runs (all when ``names`` is empty); an unknown name raises, listing the valid ones."""
    return [study.run(n) for n in names] if names else list(study.runs)


def cancel(study: Study, names: list[str] | None = None) -> list[str]:
    """Cancels the selected runs that have not ended; returns their names."""
    rows = {r.name: r for r in study_status(study)}
    targets = [run for run in select(study, names) if rows[run.name].state in STILL_GOING]
    if study.meta.get("launcher") in LOCAL_LAUNCHERS:
        for run in targets:
            if run.job_id and rows[run.name].state == "RUNNING":
                _interrupt_local(study, run)
    else:
        ids = [run.job_id for run in targets if run.job_id]
        if ids:
            # scancel sends SIGTERM, which our jobs take for a preemption (checkpoint, then requeue): switch the
            # requeue off first, so the job checkpoints and ends for good
            subprocess.run(
                ["scontrol", "update", f"JobId={','.join(ids)}", "Requeue=0"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            done = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                raise LaunchError(
                    f"scancel {' '.join(ids)} failed: {done.stderr.strip()}. Fix: check the job ids with "
                    f"squeue, or cancel them by hand and run cancel again to mark them"
                )
    for run in targets:
        run.state, run.error = "CANCELLED", "cancelled with python -m r2d2_hpc.study cancel"
    study.save()
    return [run.name for run in targets]


def _interrupt_local(study: Study, run: StudyRun) -> None:
    """SIGINT to the run's submitit controller: it interrupts, then kills, every rank of the run."""
    if study.meta.get("host") not in (None, socket.gethostname()):
        raise LaunchError(
            f"{study.dir}: this local study runs on {study.meta.get('host')}, not here. Fix: run cancel there"
        )
    if process_alive(run.job_id or "", "submitit"):
        os.kill(int(run.job_id or 0), signal.SIGINT)


def resumable(rows: list[RunStatus]) -> list[str]:
    """Names of the runs that did not complete and are not going either."""
    return [r.name for r in rows if r.state != "COMPLETED" and r.state not in STILL_GOING - {"PLANNED"}]


def resume(study: Study, names: list[str] | None = None) -> list[StudyRun]:
    """Starts the selected runs that did not complete again; returns them (local: after they have run)."""
    launcher = study.meta.get("launcher", "local")
    rows = study_status(study)
    if launcher in LOCAL_LAUNCHERS:
        busy = [r.name for r in rows if r.state in ("RUNNING", "PENDING")]
        pid = str(study.meta.get("launcher_pid") or "")
        if busy or (pid and pid != str(os.getpid()) and process_alive(pid, "r2d2_hpc")):
            raise LaunchError(
                f"{study.dir}: its launcher (pid {pid}) is still running"
                + (f" runs {', '.join(busy)}" if busy else "")
                + ". Fix: wait for it to end (after a cancel it ends once its current run has stopped), "
                f"or cancel it first: python -m r2d2_hpc.study cancel {study.dir}"
            )
    wanted = set(resumable(rows))
    runs = [run for run in select(study, names) if run.name in wanted]
    if not runs:
        return []
    lc = to_dataclass(LaunchConfig, study.meta["config"])
    configs = {run.name: study.run_config(run) for run in runs}
    for run in runs:
        if run.job_id:
            run.extra.setdefault("previous_jobs", []).append({"job_id": run.job_id, "state": run.state})
        run.job_id, run.state, run.error = None, "PLANNED", None
    if launcher in LOCAL_LAUNCHERS:
        study.meta["launcher_pid"], study.meta["host"] = os.getpid(), socket.gethostname()
    study.save(keep_cancelled=False)
    if launcher in LOCAL_LAUNCHERS:
        from r2d2_hpc.launch.executors import run_local

        run_local(study, lc, configs)
    elif launcher == "sbatch":
        from r2d2_hpc.launch.sbatch import submit

        for run in runs:
            run.job_id, run.state = submit(_script(study, run)), "SUBMITTED"
        study.save()
    else:
        from r2d2_hpc.launch.executors import submit_slurm

        submit_slurm(study, lc, configs, runs)
    return runs


def _script(study: Study, run: StudyRun) -> Path:
    path = study.dir / "sbatch" / f"{run.name}.sbatch"
    if not path.is_file():
        raise LaunchError(
            f"{path} does not exist; expected the run's sbatch script. Fix: launch the study again"
        )
    return path
