"""``python -m r2d2_hpc.launch``: run a scaling study (models x scales x repeats), then write its report.

With no argument it runs the default study on this machine: the real demo data (prepared if missing), U-Net and
FCN at 1 and 2 ranks as local processes (gloo). ``launcher=slurm`` submits every run at once through submitit
(arrays where the executor parameters are equal); ``study.attach=<dir>`` re-attaches to a submitted study;
``launcher=sbatch`` renders one sbatch script per run instead. See conf/launch.yaml and conf/experiment/.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from r2d2_hpc.config import CONF_DIR, LaunchConfig, PrepareConfig, register_configs, to_dataclass
from r2d2_hpc.errors import LaunchError, R2D2Error
from r2d2_hpc.jobs import TrainJob
from r2d2_hpc.study import (
    Study,
    job_outcome,
    model_configs,
    plan,
    run_config,
    store_accounting,
    wait_all,
)

log = logging.getLogger("r2d2_hpc.launch")
register_configs()


def ensure_data(lc: LaunchConfig) -> None:
    """Prepares ``data.shards`` from the data source when it has no manifest yet."""
    shard_dir = Path(lc.data.shard_dir())
    if (shard_dir / "manifest.json").is_file():
        return
    if not lc.prepare_if_missing:
        raise LaunchError(
            f"{shard_dir} has no manifest.json; expected prepared shards. Fix: run "
            f"python -m r2d2_hpc.prepare data={lc.data.name} data.shards={shard_dir}"
        )
    from r2d2_hpc.data.prepare import run_prepare

    log.info("preparing %s into %s (once)", lc.data.name, shard_dir)
    run_prepare(PrepareConfig(data=lc.data, out=str(shard_dir), progress=False))


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
    """A submitit SlurmExecutor with the launcher's parameters (one task per GPU, or CPU ranks)."""
    import submitit

    lp = lc.launcher
    params: dict[str, Any] = {
        "time": lp.time_min,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": lp.cpus_per_task,
        "signal_delay_s": lp.signal_delay_s,
        "setup": list(lp.setup),
        "additional_parameters": {"requeue": True, **lp.extra_sbatch},
        "job_name": "r2d2",
    }
    if lp.gpus_per_node:
        params["gpus_per_node"] = lp.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(lp, key):
            params[key] = getattr(lp, key)
    if lp.mem_gb:
        params["mem"] = f"{int(lp.mem_gb)}GB"
    if lp.exclusive:
        params["exclusive"] = True
    executor = submitit.SlurmExecutor(
        folder=folder, python=lp.python or sys.executable, max_num_timeout=lp.max_requeues
    )
    executor.update_parameters(**params)
    return executor


def run_local(study: Study, lc: LaunchConfig, configs: dict[str, Any]) -> None:
    """Runs one run at a time (a small machine: concurrent runs would distort every timing)."""
    for run in study.runs:
        if run.state == "COMPLETED":
            continue
        executor = _local_executor(study.dir / "jobs", lc, run.world_size)
        job = executor.submit(TrainJob(configs[run.name], lc.launcher.max_requeues, master_port=_free_port()))
        run.job_id, run.state = str(job.job_id), "RUNNING"
        study.save()
        log.info("%s: %d rank(s) ...", run.name, run.world_size)
        run.state, run.error = job_outcome(job)
        study.save()
        if run.error:
            log.error("%s failed: %s", run.name, run.error.splitlines()[0])


def submit_slurm(study: Study, lc: LaunchConfig, configs: dict[str, Any]) -> dict[str, Any]:
    """Submits every run at once; runs with equal executor parameters go in one array."""
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for run in study.runs:
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
            f"{study.dir}: a {study.meta.get('launcher')} study cannot be re-attached (its processes "
            "ended with the launcher). Fix: launch it again; finished runs are kept (resume=auto)"
        )
    return {
        r.name: submitit.SlurmJob(folder=study.dir / "jobs", job_id=r.job_id)
        for r in study.runs
        if r.job_id and r.state not in ("COMPLETED", "FAILED", "CANCELLED")
    }


def launch(lc: LaunchConfig, explicit_model: bool = False) -> Path:
    """Runs (or submits, or re-attaches to) a study; returns the study directory."""
    if lc.study.attach:
        study = Study.load(Path(lc.study.attach))
        wait_all(study, reattach(study))
        store_accounting(study)
        return _finish(study, lc)
    ensure_data(lc)
    models = model_configs(lc, explicit_model)
    runs = plan(lc, models)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # A model chosen on the command line names the directory too: Hydra multirun jobs start in the same second.
    tag = f"-{'-'.join(models)}" if explicit_model else ""
    study_dir = Path(lc.study.dir or f"runs/{lc.study.name}{tag}-{stamp}").absolute()
    configs = {r.name: run_config(lc, models[r.model], study_dir, r) for r in runs}
    study = Study.create(study_dir, runs, lc.launcher.name, _plain(lc))
    log.info("study %s: %d run(s) with launcher=%s", study_dir, len(runs), lc.launcher.name)
    if lc.launcher.name == "sbatch":
        from r2d2_hpc.sbatch import render_study

        render_study(study, lc, configs)
        return study.dir
    if lc.launcher.name in ("local", "debug"):
        run_local(study, lc, configs)
    else:
        jobs = submit_slurm(study, lc, configs)
        if not lc.study.wait:
            print(
                f"submitted {len(jobs)} job(s); collect them later with: python -m r2d2_hpc.launch "
                f"study.attach={study.dir}"
            )
            return study.dir
        wait_all(study, jobs)
        store_accounting(study)
    return _finish(study, lc)


def _finish(study: Study, lc: LaunchConfig) -> Path:
    print(study.summary())
    if lc.study.report:
        from r2d2_hpc.analysis import analyse

        analyse([study.dir], out=study.dir / "report")
        print(f"report: {study.dir / 'report' / 'report.html'} (and report.md)")
    return study.dir


def _plain(lc: LaunchConfig) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(asdict(replace(lc)), default=str))


def _explicit_model() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not inside a Hydra app
        return False
    return any(o.split("=", 1)[0].lstrip("+~") == "model" for o in overrides)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="launch")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: compose, check, launch."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        launch(to_dataclass(LaunchConfig, cfg), _explicit_model())
    except R2D2Error as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
