"""``study.attach=<dir>``: one rule for every launcher: continue the study where it stopped, then report.

- local (or debug): the runs that did not complete run again, each resuming from its last checkpoint
  (``resume=auto``, through :func:`~.control.resume`); completed runs are kept. A launcher that is still running
  the study is named instead (wait for it, or cancel it).
- slurm (submitit): wait for the recorded jobs.
- sbatch: wait for the recorded job ids (``launcher.submit=true``), or for the queued jobs named after the runs
  (``r2d2-<run>``, working directory the study) when the scripts were submitted by hand; a run with neither a job
  nor a result is named, with the command that submits it.
On a complete study attaching just writes the report again. Launching again into an existing ``study.dir`` is
refused with the same advice: attach.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from r2d2_hpc.errors import LaunchError
from r2d2_hpc.launch.accounting import store_accounting
from r2d2_hpc.launch.control import resume
from r2d2_hpc.launch.executors import reattach
from r2d2_hpc.launch.follow import follow
from r2d2_hpc.launch.outcome import result_json_outcome
from r2d2_hpc.launch.record import Study
from r2d2_hpc.launch.status import LOCAL_LAUNCHERS, study_status

log = logging.getLogger("r2d2_hpc.launch")


def attach(study: Study) -> None:
    """Brings ``study`` to an end (see the module docstring); study.json records every run's state."""
    launcher = study.meta.get("launcher")
    if launcher in LOCAL_LAUNCHERS:
        resume_local(study)
        return
    if launcher == "sbatch":
        queue_note = _adopt_queued_jobs(study)
        _settle_runs_without_jobs(study, queue_note)
    else:
        reattach(study)  # checks that the study has submitit jobs
    follow(study)
    store_accounting(study)


def resume_local(study: Study) -> None:
    """Runs the study's unfinished runs again, from their checkpoints, with their recorded configs."""
    for row in study_status(study):
        if row.state == "COMPLETED":
            print(f"{row.name}: completed before; kept")
        else:
            why = f" ({row.error or row.reason})" if row.error or row.reason else ""
            start = "from its checkpoint" if _has_checkpoint(study, row.name) else "from the start"
            print(f"{row.name}: {row.state}{why}; running it again ({start})", flush=True)
    resume(study)


def _has_checkpoint(study: Study, name: str) -> bool:
    return (study.dir / study.run(name).run_dir / "checkpoints" / "last.pt").is_file()


def _settle_runs_without_jobs(study: Study, queue_note: str = "") -> None:
    """Runs with no job id: their result.json decides; without one they are missing, and named."""
    missing = []
    for run in study.runs:
        if run.job_id:
            continue
        found = result_json_outcome(study.dir / run.run_dir)
        if found is None:
            missing.append(run)
        else:
            run.state, run.error = found
    study.save()
    if missing:
        commands = "\n".join(f"  sbatch {study.dir / 'sbatch' / (r.name + '.sbatch')}" for r in missing)
        raise LaunchError(
            f"{study.dir}: {len(missing)} of {len(study.runs)} run(s) have no result and no recorded or queued "
            f"job: {', '.join(r.name for r in missing)}{queue_note}. Fix: submit them, then attach again:\n"
            f"{commands}"
        )


def _adopt_queued_jobs(study: Study) -> str:
    """Scripts submitted by hand (no recorded job id): find their jobs by name and working directory (--chdir).

    Returns a note for the message about missing runs when the queue could not be read (no Slurm client here,
    or a controller that does not answer): runs with a result.json are settled from it all the same.
    """
    if all(r.job_id for r in study.runs):
        return ""
    if shutil.which("squeue") is None:
        return " (squeue is not installed here, so queued jobs could not be looked for)"
    done = subprocess.run(["squeue", "-h", "-o", "%A|%j|%Z"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        log.warning("squeue failed (%s): queued jobs of this study cannot be looked for; check sinfo", reason)
        return f" (the queue could not be read: squeue said {reason!r}; check that Slurm answers with sinfo)"
    rows = [line.strip().split("|", 2) for line in done.stdout.splitlines() if line.count("|") == 2]
    queued = {(name, str(Path(workdir))): job_id for job_id, name, workdir in rows}
    for run in study.runs:
        job_id = queued.get((f"r2d2-{run.name}", str(study.dir)))
        if not run.job_id and job_id:
            run.job_id, run.state = job_id, "SUBMITTED"
            print(f"{run.name}: found its job {job_id} in the queue")
    study.save()
    return ""
