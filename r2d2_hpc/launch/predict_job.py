"""``python -m r2d2_hpc.predict ... launcher=local|slurm``: prediction as a launched job, followed like a study.

The job has one task per part (``launcher.tasks_per_node``, or one per GPU, on ``nodes`` nodes); each task
predicts its round-robin share of the cases (:mod:`r2d2_hpc.inference.runner`), and the last part to finish merges
the records. The output folder doubles as a one-run study: its ``study.json`` lets
``python -m r2d2_hpc.study status|logs|cancel <out>`` show and steer the job, with cases written / total as the
run's progress.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from r2d2_hpc.config import LaunchConfig, LauncherConfig, to_dataclass
from r2d2_hpc.errors import LaunchError, R2D2Error
from r2d2_hpc.launch.record import FINISHED, STUDY_FILE, Study, StudyRun, job_outcome

log = logging.getLogger("r2d2_hpc.predict")
PREDICT_KIND = "predict"


class PredictJob:
    """What every task of a launched prediction runs: its part of the cases."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = replace(cfg, launcher=None)  # inside the job: predict here, launch nothing

    def __call__(self) -> dict[str, Any]:
        from r2d2_hpc.inference.runner import run_predict

        rank = int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", os.environ.get("SLURM_PROCID", "0")))
        logging.basicConfig(
            level=logging.INFO,
            force=True,
            format=f"%(asctime)s [part {rank}] %(levelname)s %(name)s: %(message)s",
        )
        run = run_predict(self.cfg)
        if run.failures:
            cases = ", ".join(f"{f['case_id']} ({f['error']})" for f in run.failures)
            raise R2D2Error(
                f"part {run.part} of {run.num_parts}: {len(run.failures)} case(s) failed: {cases}"
            )
        return {
            "status": "completed",
            "part": run.part,
            "num_parts": run.num_parts,
            "written": len(run.written),
        }


def launch_predict(cfg: Any) -> Study:
    """Submits (slurm) or runs (local) the prediction job of ``cfg``; returns its one-run study."""
    import submitit

    lp: LauncherConfig = to_dataclass(LauncherConfig, cfg.launcher)
    if lp.name not in ("local", "slurm"):
        raise LaunchError(f"launcher={lp.name} cannot run predict; valid choices are: local, slurm")
    per_node = lp.ranks_per_node()
    nodes = 1 if lp.name == "local" else cfg.nodes
    study_dir = Path(cfg.out).absolute()
    _clear_finished_record(study_dir)
    run = StudyRun("predict", PREDICT_KIND, nodes, nodes * per_node, 0, ".", extra={"kind": PREDICT_KIND})
    study = Study.create(
        study_dir, [run], lp.name, {"predict": json.loads(json.dumps(asdict(cfg), default=str))}
    )
    if lp.name == "local":
        executor = submitit.LocalExecutor(folder=study_dir / "jobs")
        executor.update_parameters(tasks_per_node=run.world_size, nodes=1, timeout_min=lp.time_min)
    else:
        from r2d2_hpc.launch.executors import slurm_executor

        executor = slurm_executor(study_dir / "jobs", LaunchConfig(launcher=lp), nodes, per_node)
    job = executor.submit(PredictJob(cfg))
    run.job_id, run.state = str(job.job_id), "RUNNING" if lp.name == "local" else "SUBMITTED"
    study.save()
    print(
        f"predict job {run.job_id}: {run.world_size} part(s); follow it with python -m r2d2_hpc.study status {study_dir}"
    )
    if lp.name == "local":
        while not job.done():
            time.sleep(0.5)
        study.keep_cancelled()
        if run.state != "CANCELLED":
            run.state, run.error = job_outcome(job)
        study.save()
    elif cfg.wait:
        from r2d2_hpc.launch.follow import follow

        follow(study)
    return study


def _clear_finished_record(study_dir: Path) -> None:
    """A new prediction into a folder whose last launched one has ended replaces its record."""
    path = study_dir / STUDY_FILE
    if not path.is_file():
        return
    old = Study.load(study_dir)
    if any(r.state not in FINISHED for r in old.runs):
        raise LaunchError(
            f"{path}: a prediction launched into {study_dir} has not ended (states "
            f"{', '.join(r.state for r in old.runs)}). Fix: wait for it, cancel it with "
            f"python -m r2d2_hpc.study cancel {study_dir}, or choose another out="
        )
    os.replace(path, path.with_name(f"{STUDY_FILE}.{int(time.time())}.prev"))
