"""What a Slurm job asks for, on both paths (submitit's generated script and our sbatch template): srun's CPUs per
task, the GPUs of a run smaller than a node, and node-exclusive allocation by default (issue 11 items 1 and 7)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from r2d2_hpc.config import CONF_DIR, LaunchConfig, register_configs, to_dataclass
from r2d2_hpc.launch.executors import slurm_executor
from r2d2_hpc.launch.sbatch import render_script

GOLDEN = Path(__file__).parent / "golden"
REFRESH = "R2D2_REFRESH_GOLDEN"
GPU_NODE = [
    "launcher.gpus_per_node=4",
    "launcher.cpus_per_task=8",
    "launcher.python=/opt/r2d2/.venv/bin/python",
]


def _launch_config(launcher: str, overrides: list[str]) -> LaunchConfig:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_dataclass(LaunchConfig, compose("launch", overrides=[f"launcher={launcher}", *overrides]))


def _submitit_script(lc: LaunchConfig, nodes: int, tasks_per_node: int) -> str:
    executor = slurm_executor(Path("/scratch/study/jobs"), lc, nodes, tasks_per_node)
    # the text submitit writes as the job's sbatch file (its command names the pickled job's folder)
    return executor._make_submission_file_text(
        "python -u -m submitit.core._submit /scratch/study/jobs", "uid"
    )


def _sbatch_script(lc: LaunchConfig, nodes: int, tasks_per_node: int) -> str:
    return render_script(lc, "run", nodes, "/scratch/study/runs/run", "/scratch/study", tasks_per_node)


def _srun_line(script: str) -> str:
    (line,) = [ln for ln in script.splitlines() if re.match(r"^srun ", ln)]
    return line


def test_submitit_script_matches_golden_file() -> None:
    lc = _launch_config("slurm", [*GPU_NODE, "launcher.partition=gpu", "launcher.time_min=90"])
    text = _submitit_script(lc, 2, 4)
    golden = GOLDEN / "submitit-gpu-4x2.sh"
    if os.environ.get(REFRESH):
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}: run the tests once with {REFRESH}=1 and review the file"
    assert text == golden.read_text(), f"{golden} differs; if intended, refresh with {REFRESH}=1 and review"


@pytest.mark.parametrize("path", ["submitit", "sbatch"])
def test_srun_gets_the_cpus_per_task_explicitly(path: str) -> None:
    # Slurm 22.05-23.02: srun does not inherit the job's --cpus-per-task, so each rank would get one CPU.
    if path == "submitit":
        script = _submitit_script(_launch_config("slurm", GPU_NODE), 1, 4)
    else:
        script = _sbatch_script(_launch_config("sbatch", GPU_NODE), 1, 4)
    assert "#SBATCH --cpus-per-task=8" in script
    assert "--cpus-per-task=8" in _srun_line(script).split()


@pytest.mark.parametrize("path", ["submitit", "sbatch"])
@pytest.mark.parametrize(("nodes", "tasks_per_node", "gpus"), [(1, 1, 1), (1, 2, 2), (2, 4, 4)])
def test_a_run_requests_only_the_gpus_its_ranks_use(
    path: str, nodes: int, tasks_per_node: int, gpus: int
) -> None:
    render = _submitit_script if path == "submitit" else _sbatch_script
    script = render(
        _launch_config("slurm" if path == "submitit" else "sbatch", GPU_NODE), nodes, tasks_per_node
    )
    assert re.findall(r"^#SBATCH --gpus-per-node=(\d+)$", script, re.M) == [str(gpus)]
    assert re.findall(r"^#SBATCH --ntasks-per-node=(\d+)$", script, re.M) == [str(tasks_per_node)]


@pytest.mark.parametrize("path", ["submitit", "sbatch"])
def test_jobs_are_node_exclusive_unless_turned_off(path: str) -> None:
    launcher = "slurm" if path == "submitit" else "sbatch"
    render = _submitit_script if path == "submitit" else _sbatch_script
    assert "#SBATCH --exclusive" in render(_launch_config(launcher, []), 1, 1).splitlines()
    shared = render(_launch_config(launcher, ["launcher.exclusive=false"]), 1, 1)
    assert "exclusive" not in shared
