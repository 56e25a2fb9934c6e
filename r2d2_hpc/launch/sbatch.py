"""``launcher=sbatch``: one sbatch script per run of a study, for people who prefer ``sbatch`` to submitit.

Each script runs ``srun python -m r2d2_hpc.train`` with one task per GPU (or CPU rank) and the run's complete,
resolved config (written beside it as ``<run>.yaml``, so the job does not depend on the submitting shell or on
``conf/``). ``srun`` gets ``--cpus-per-task`` explicitly: Slurm 22.05 to 23.02 no longer pass the job's value on to
srun, and every rank would get one CPU. Every path in the script is absolute and ``#SBATCH --chdir`` is the study
directory, so it runs whatever directory it is submitted from. The user's ``launcher.setup`` lines come before
``set -u`` (module and conda init scripts often read unset variables).

Stopping: ``--signal=USR1@<delay>`` reaches every task before the time limit, and a preemption (a job of a higher
partition taking the nodes, ``PreemptMode=REQUEUE``) sends SIGTERM to every task, ``GraceTime`` before SIGKILL.
Either way the ranks stop at the next step boundary, rank 0 checkpoints and writes ``result.json`` with status
``preempted``, and the ranks exit 0; the script then requeues the job itself (``scontrol requeue``: a job that
ends by itself within GraceTime would otherwise count as COMPLETED) until ``launcher.max_requeues`` restarts, and
the requeued job resumes from the checkpoint (``resume=auto``). Only *this* attempt's outcome counts: a
``result.json`` written before the attempt started (an earlier, preempted attempt's) never makes a crashing attempt
look preempted; a crash fails the job with the ranks' exit status.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from string import Template
from typing import Any

import yaml

from r2d2_hpc.config import LaunchConfig, LauncherConfig, RunConfig
from r2d2_hpc.errors import LaunchError

TEMPLATE = Template("""#!/bin/bash
# r2d2_hpc run $run (study $study_dir): rendered by python -m r2d2_hpc.launch launcher=sbatch
#SBATCH --job-name=r2d2-$run
#SBATCH --chdir=$study_dir
#SBATCH --output=$script_dir/$run-%j.out
#SBATCH --error=$script_dir/$run-%j.err
#SBATCH --open-mode=append
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
#SBATCH --cpus-per-task=$cpus_per_task
#SBATCH --time=$time
#SBATCH --signal=USR1@$signal_delay_s
#SBATCH --requeue
$options
$setup
set -uo pipefail
export OMP_NUM_THREADS=$${SLURM_CPUS_PER_TASK:-1}
attempt_start=$$(mktemp)  # a result.json older than this is an earlier attempt's
srun --kill-on-bad-exit=1 --cpus-per-task=$cpus_per_task $python -m r2d2_hpc.train --config-dir $script_dir --config-name $run
status=$$?
result=$run_dir/result.json
preempted=0
if [ "$$status" -eq 0 ] && [ "$$result" -nt "$$attempt_start" ] && grep -q '"status": "preempted"' "$$result"; then
  preempted=1
fi
rm -f "$$attempt_start"
[ "$$preempted" -eq 1 ] || exit $$status  # completed (0), or this attempt crashed: fail, no requeue
# Preempted (SIGTERM) or near the time limit (USR1): the ranks checkpointed at a step boundary; requeue to resume.
if [ "$${SLURM_RESTART_COUNT:-0}" -ge $max_requeues ]; then
  echo "r2d2: stopped early $$(( $${SLURM_RESTART_COUNT:-0} + 1 )) times (launcher.max_requeues=$max_requeues): not requeued; resume with resume=auto" >&2
  exit 3
fi
scontrol requeue "$$SLURM_JOB_ID" || { echo "r2d2: scontrol requeue $$SLURM_JOB_ID failed" >&2; exit 4; }
exit 0
""")


def sbatch_options(lp: LauncherConfig, tasks_per_node: int | None = None) -> list[str]:
    """The optional #SBATCH lines of a launcher config, in a fixed order; a run of ``tasks_per_node`` ranks per
    node asks for that many GPUs at most (a run smaller than a node requests only what it uses)."""
    lines = []
    gpus = min(lp.gpus_per_node, tasks_per_node or lp.ranks_per_node())
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(lp, key):
            lines.append(f"--{key}={getattr(lp, key)}")
    if lp.mem_gb:
        lines.append(f"--mem={int(lp.mem_gb)}G")
    if lp.exclusive:
        lines.append("--exclusive")
    for key, value in sorted(lp.extra_sbatch.items()):
        lines.append(f"--{key}" if value is True else f"--{key}={value}")
    return [f"#SBATCH {line}" for line in lines]


def render_script(
    lc: LaunchConfig,
    run_name: str,
    nodes: int,
    run_dir: str,
    study_dir: str,
    tasks_per_node: int | None = None,
) -> str:
    """The sbatch script of one run."""
    lp = lc.launcher
    script_dir = f"{study_dir}/sbatch"
    hours, minutes = divmod(lp.time_min, 60)
    tasks_per_node = tasks_per_node or lp.ranks_per_node()
    return TEMPLATE.substitute(
        run=run_name,
        study_dir=study_dir,
        script_dir=script_dir,
        nodes=nodes,
        tasks_per_node=tasks_per_node,
        cpus_per_task=lp.cpus_per_task,
        time=f"{hours:02d}:{minutes:02d}:00",
        signal_delay_s=lp.signal_delay_s,
        options="\n".join(sbatch_options(lp, tasks_per_node)),
        setup="\n".join(lp.setup),
        python=shlex.quote(job_python(lp)),
        run_dir=shlex.quote(run_dir),
        max_requeues=lp.max_requeues,
    )


def job_python(lp: LauncherConfig) -> str:
    """The python of each job: ``launcher.python``; else ``python`` when a ``launcher.setup`` line activates an
    environment (conda/mamba/venv activate: that environment's python must run, not the submitting one's);
    else the python running the launcher."""
    if lp.python:
        return lp.python
    if any(_ACTIVATES.search(line) for line in lp.setup):
        return "python"
    return sys.executable


_ACTIVATES = re.compile(r"(^|[\s;&|/])activate\b|\b(conda|mamba|micromamba)\s+activate\b")


def render_config(cfg: RunConfig) -> str:
    """The run's resolved config as a Hydra primary config for ``python -m r2d2_hpc.train``."""
    body = json.loads(json.dumps(asdict(cfg), default=str))
    body["defaults"] = [
        "run_schema",
        {"override hydra/job_logging": "none"},
        {"override hydra/hydra_logging": "none"},
        "_self_",
    ]
    body["hydra"] = {"output_subdir": None, "run": {"dir": "."}, "job": {"chdir": False}}
    return yaml.safe_dump(body, sort_keys=False)


def render_study(study: Any, lc: LaunchConfig, configs: dict[str, RunConfig]) -> list[Path]:
    """Writes every run's script and config into ``<study>/sbatch``; submits them when ``launcher.submit``."""
    script_dir = study.dir / "sbatch"
    script_dir.mkdir(parents=True, exist_ok=True)
    scripts = []
    for run in study.runs:
        cfg = configs[run.name]
        _write(script_dir / f"{run.name}.yaml", render_config(cfg))
        script = script_dir / f"{run.name}.sbatch"
        _write(
            script,
            render_script(lc, run.name, run.nodes, cfg.run_dir, str(study.dir), run.world_size // run.nodes),
        )
        scripts.append(script)
    if lc.launcher.submit:
        for run, script in zip(study.runs, scripts, strict=True):
            run.job_id, run.state = submit(script), "SUBMITTED"
        study.save()
        print(
            f"submitted {len(scripts)} job(s); wait for them and write the report with: "
            f"python -m r2d2_hpc.launch study.attach={study.dir}"
        )
    else:
        print(
            f"rendered {len(scripts)} sbatch script(s) in {script_dir}; submit them (from any directory) with:"
        )
        for script in scripts:
            print(f"  sbatch {script}")
        print(
            f"then wait for them and write the report with: python -m r2d2_hpc.launch study.attach={study.dir}"
        )
    return scripts


def submit(script: Path) -> str:
    """``sbatch --parsable <script>``; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(
            f"{script}: sbatch refused it: {done.stderr.strip()}. Fix: adjust the launcher.* settings "
            "(partition, time, resources) to what the cluster allows"
        )
    return done.stdout.strip().split(";")[0]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
