"""Where a study's runs execute: local processes one after the other, or Slurm jobs through submitit."""

from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from r2d2_hpc.config import LaunchConfig
from r2d2_hpc.errors import LaunchError
from r2d2_hpc.launch.job import TrainJob
from r2d2_hpc.launch.live import LocalProgress
from r2d2_hpc.launch.progress import run_progress
from r2d2_hpc.launch.record import Study, run_outcome
from r2d2_hpc.launch.sbatch import job_python

log = logging.getLogger("r2d2_hpc.launch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_executor(folder: Path, lc: LaunchConfig, world_size: int) -> Any:
    import submitit

    if lc.launcher.name == "debug":
        if world_size != 1:
            raise LaunchError(
                f"launcher=debug runs in this process, so only 1 rank; study.scales asks for "
                f"{world_size}. Fix: launcher=local, or study.scales=[1]"
            )
        return submitit.DebugExecutor(folder=folder)
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=world_size, nodes=1, timeout_min=lc.launcher.time_min)
    return executor


def slurm_executor(folder: Path, lc: LaunchConfig, nodes: int, tasks_per_node: int) -> Any:
    """A submitit SlurmExecutor with the launcher's parameters (one task per GPU, or CPU ranks).

    A run smaller than a node asks for only the GPUs its ranks use (``gpus_per_node`` is capped at the run's
    tasks per node). ``srun`` gets ``--cpus-per-task`` explicitly: Slurm 22.05 to 23.02 do not pass the job's
    value on to srun, so every rank would get one CPU and its DataLoader workers would share it.
    """
    import submitit

    lp = lc.launcher
    params: dict[str, Any] = {
        "time": lp.time_min,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": lp.cpus_per_task,
        "signal_delay_s": lp.signal_delay_s,
        "setup": list(lp.setup),
        "srun_args": [f"--cpus-per-task={lp.cpus_per_task}"],
        "additional_parameters": {"requeue": True, **lp.extra_sbatch},
        "job_name": "r2d2",
    }
    gpus = gpus_per_node(lc, tasks_per_node)
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(lp, key):
            params[key] = getattr(lp, key)
    if lp.mem_gb:
        params["mem"] = f"{int(lp.mem_gb)}GB"
    if lp.exclusive:
        params["exclusive"] = True
    executor = submitit.SlurmExecutor(folder=folder, python=job_python(lp), max_num_timeout=lp.max_requeues)
    executor.update_parameters(**params)
    return executor


def gpus_per_node(lc: LaunchConfig, tasks_per_node: int) -> int:
    """The GPUs per node a run asks for: one per rank, at most ``launcher.gpus_per_node`` (0 on CPU nodes)."""
    return min(lc.launcher.gpus_per_node, tasks_per_node)


def run_local(study: Study, lc: LaunchConfig, configs: dict[str, Any]) -> None:
    """Runs the PLANNED runs one at a time (a small machine: concurrent runs would distort every timing).

    Shows their progress (:class:`~.live.LocalProgress`); a run cancelled meanwhile
    (``python -m r2d2_hpc.study cancel``) is not started, or stays CANCELLED.
    """
    todo = [run for run in study.runs if run.state == "PLANNED"]
    progress = LocalProgress(
        [r.name for r in todo],
        {r.name: configs[r.name].train.max_steps for r in todo},
        lc.train.log_every_steps,
    )
    try:
        for run in todo:
            study.keep_cancelled()
            if run.state == "CANCELLED":
                progress.finish(run.name, run.state)
                continue
            executor = _local_executor(study.dir / "jobs", lc, run.world_size)
            job = executor.submit(
                TrainJob(configs[run.name], lc.launcher.max_requeues, master_port=_free_port())
            )
            run.job_id, run.state = str(job.job_id), "RUNNING"
            study.save()
            log.info("%s: %d rank(s) ...", run.name, run.world_size)
            progress.start(run.name)
            while lc.launcher.name != "debug" and not job.done():  # a debug job runs in results()
                progress.update(run.name, run_progress(study.dir / run.run_dir))
                time.sleep(0.5)
            progress.update(run.name, run_progress(study.dir / run.run_dir))
            study.keep_cancelled()
            if run.state != "CANCELLED":  # a cancelled job leaves no result: do not wait for one
                run.state, run.error = run_outcome(study, run, job)
            study.save()  # keeps a CANCELLED mark written while the run ran
            progress.finish(run.name, run.state)
            if run.error and run.state != "CANCELLED":
                log.error("%s %s: %s", run.name, run.state.lower(), run.error.splitlines()[0])
    finally:
        progress.close()


def submit_slurm(
    study: Study, lc: LaunchConfig, configs: dict[str, Any], runs: list[Any] | None = None
) -> dict[str, Any]:
    """Submits every run (or ``runs``) at once; runs with equal executor parameters go in one array."""
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for run in study.runs if runs is None else runs:
        groups[(run.nodes, run.world_size // run.nodes)].append(run)
    jobs = {}
    for (nodes, tasks_per_node), runs in groups.items():
        executor = slurm_executor(study.dir / "jobs", lc, nodes, tasks_per_node)
        with executor.batch():
            pending = [
                (run, executor.submit(TrainJob(configs[run.name], lc.launcher.max_requeues))) for run in runs
            ]
        for run, job in pending:
            run.job_id, run.state = str(job.job_id), "SUBMITTED"
            jobs[run.name] = job
    study.save()
    return jobs


def reattach(study: Study) -> dict[str, Any]:
    """submitit job handles of a Slurm study's unfinished runs."""
    import submitit

    if study.meta.get("launcher") != "slurm":
        raise LaunchError(
            f"{study.dir}: a {study.meta.get('launcher')} study has no submitit jobs to wait for. "
            f"Fix: python -m r2d2_hpc.launch study.attach={study.dir} (launch/attach.py handles every launcher)"
        )
    return {
        r.name: submitit.SlurmJob(folder=study.dir / "jobs", job_id=r.job_id)
        for r in study.runs
        if r.job_id and r.state not in ("COMPLETED", "DIVERGED", "FAILED", "CANCELLED")
    }
