"""``python -m r2d2_hpc.launch``: run a scaling study (models x scales x repeats), then write its report.

``experiment=demo`` is the demo on this machine (``scripts/main.sh`` prepares its data first): U-Net and FCN at
1 and 2 ranks as local processes (gloo). Without an experiment a study gets the training defaults of
``conf/train/``. The plan is printed before anything starts; ``study.dry_run=true`` prints it (and the scripts it
would submit) and starts nothing. ``data.shards`` must already be prepared: launch never writes data.
``launcher=slurm`` submits every run at once through submitit (arrays where the executor parameters are equal);
``launcher=sbatch`` renders one sbatch script per run instead; ``study.attach=<dir>`` continues any study and
writes its report (launch/attach.py). See conf/launch.yaml and conf/experiment/.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from r2d2_hpc.config import CONF_DIR, LaunchConfig, register_configs, to_dataclass
from r2d2_hpc.errors import LaunchError, R2D2Error
from r2d2_hpc.launch.accounting import store_accounting
from r2d2_hpc.launch.attach import attach
from r2d2_hpc.launch.executors import run_local, submit_slurm
from r2d2_hpc.launch.finish import finish_study
from r2d2_hpc.launch.follow import follow
from r2d2_hpc.launch.plan import describe, model_configs, plan, run_config
from r2d2_hpc.launch.record import Study

log = logging.getLogger("r2d2_hpc.launch")
register_configs()


def check_data(lc: LaunchConfig) -> None:
    """``data.shards`` must hold a prepared shard set: launch never prepares (or writes) data itself."""
    shard_dir = Path(lc.data.shard_dir()).absolute()
    if (shard_dir / "manifest.json").is_file():
        return
    found = "does not exist" if not shard_dir.exists() else "has no manifest.json"
    root = f" data.root={lc.data.root}" if lc.data.root else ""
    raise LaunchError(
        f"data.shards={shard_dir} {found}: the data is not prepared; expected a shard directory written by "
        f"prepare. Fix: python -m r2d2_hpc.prepare data={lc.data.name}{root} out={shard_dir} "
        "(then launch again with the same data.shards)"
    )


def launch(lc: LaunchConfig, explicit_model: bool = False) -> Path:
    """Runs (or submits, or attaches to) a study; returns the study directory."""
    if lc.study.attach:
        study = Study.load(Path(lc.study.attach).absolute())
        attach(study)
        return _finish(study, lc)
    check_data(lc)
    models = model_configs(lc, explicit_model)
    runs = plan(lc, models)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # A model chosen on the command line names the directory too: Hydra multirun jobs start in the same second.
    tag = f"-{'-'.join(models)}" if explicit_model else ""
    study_dir = Path(lc.study.dir or f"runs/{lc.study.name}{tag}-{stamp}").absolute()
    configs = {r.name: run_config(lc, models[r.model], study_dir, r) for r in runs}
    print(describe(lc, runs, study_dir), flush=True)
    if lc.study.dry_run:
        _dry_run(lc, runs, configs, study_dir)
        return study_dir
    study = Study.create(study_dir, runs, lc.launcher.name, _plain(lc))
    study.write_run_configs(configs)
    log.info("study %s: %d run(s) with launcher=%s", study_dir, len(runs), lc.launcher.name)
    if lc.launcher.name == "sbatch":
        from r2d2_hpc.launch.sbatch import render_study

        render_study(study, lc, configs)
        return study.dir
    if lc.launcher.name in ("local", "debug"):
        run_local(study, lc, configs)
    else:
        jobs = submit_slurm(study, lc, configs)
        print(f"study {study.dir}: follow it with python -m r2d2_hpc.study status {study.dir}")
        if not lc.study.wait:
            print(
                f"submitted {len(jobs)} job(s); collect them later with: python -m r2d2_hpc.launch "
                f"study.attach={study.dir}"
            )
            return study.dir
        follow(study)
        store_accounting(study)
    return _finish(study, lc)


def _dry_run(lc: LaunchConfig, runs: list, configs: dict, study_dir: Path) -> None:
    """Prints what would be submitted (sbatch: each script; slurm: each job's sbatch options); writes nothing."""
    if lc.launcher.name == "sbatch":
        from r2d2_hpc.launch.sbatch import render_script

        for run in runs:
            text = render_script(
                lc,
                run.name,
                run.nodes,
                configs[run.name].run_dir,
                str(study_dir),
                run.world_size // run.nodes,
            )
            print(f"--- {study_dir}/sbatch/{run.name}.sbatch\n{text}", end="")
    elif lc.launcher.name == "slurm":
        from r2d2_hpc.launch.executors import slurm_executor

        for run in runs:
            executor = slurm_executor(study_dir / "jobs", lc, run.nodes, run.world_size // run.nodes)
            options = ", ".join(f"{k}={v}" for k, v in sorted(executor.parameters.items()))
            print(f"--- {run.name}: submitit sbatch options\n  {options}")
    print(f"dry run (study.dry_run=true): nothing was started or written; {len(runs)} run(s) planned")


def _finish(study: Study, lc: LaunchConfig) -> Path:
    return finish_study(study, lc.study.report)


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
