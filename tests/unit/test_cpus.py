"""Threads per rank from the CPUs a process may run on: affinity, cgroup quota, Slurm and OMP settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r2d2_hpc.train.cpus import cgroup_cpu_quota, cpus_available, plan_threads

REPO = Path(__file__).resolve().parents[2]


def _cgroup_v2(tmp_path: Path, cpu_max: str) -> tuple[Path, Path]:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job_7/step_0\n")
    (tmp_path / "fs" / "job_7" / "step_0").mkdir(parents=True, exist_ok=True)
    (tmp_path / "fs" / "job_7" / "step_0" / "cpu.max").write_text(cpu_max)
    return proc, tmp_path / "fs"


def test_cgroup_v2_quota_rounds_up_to_whole_cpus(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(*_cgroup_v2(tmp_path, "250000 100000\n")) == 3
    assert cgroup_cpu_quota(*_cgroup_v2(tmp_path, "max 100000\n")) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n2:cpu,cpuacct:/slurm/uid_1/job_9\n")
    base = tmp_path / "fs" / "cpu,cpuacct" / "slurm" / "uid_1" / "job_9"
    base.mkdir(parents=True)
    (base / "cpu.cfs_quota_us").write_text("200000\n")
    (base / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(proc, tmp_path / "fs") == 2
    (base / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(proc, tmp_path / "fs") is None


def test_available_cpus_is_the_affinity_mask_capped_by_the_quota(tmp_path: Path) -> None:
    proc, root = _cgroup_v2(tmp_path, "200000 100000")
    assert cpus_available({0, 1, 2, 3, 4, 5}, proc, root) == (2, "cgroup CPU quota")
    assert cpus_available({3}, proc, root) == (1, "affinity mask")
    assert cpus_available({0, 1, 2}, tmp_path / "missing", root) == (3, "affinity mask")


def test_threads_follow_the_budget_and_the_settings() -> None:
    plan = plan_threads(None, 4, {}, 16, "affinity mask")
    assert (plan.threads, plan.ranks_sharing, plan.warning) == (4, 4, None)
    assert plan_threads(None, 4, {"OMP_NUM_THREADS": "2"}, 16, "x").threads == 2
    assert plan_threads(3, 4, {"OMP_NUM_THREADS": "2"}, 16, "x").source == "train.threads_per_rank"
    # srun bound each task to its own 6 CPUs: they are not divided by the 4 local ranks
    bound = plan_threads(None, 4, {"SLURM_CPUS_PER_TASK": "6"}, 6, "affinity mask")
    assert (bound.threads, bound.ranks_sharing, bound.warning) == (6, 1, None)
    # no CPU binding: the 4 tasks share the node's 32 CPUs; SLURM_CPUS_PER_TASK caps each
    shared = plan_threads(None, 4, {"SLURM_CPUS_PER_TASK": "6"}, 32, "affinity mask")
    assert (shared.threads, shared.ranks_sharing) == (6, 4)


def test_more_threads_than_cpus_is_a_warning_that_names_the_fix() -> None:
    plan = plan_threads(None, 4, {}, 2, "affinity mask")
    assert plan.threads == 1
    assert plan.warning is not None and "4 rank(s) x 1 thread(s) = 4 threads on 2 CPU(s)" in plan.warning
    assert "fewer ranks per node" in plan.warning
    assert plan_threads(4, 1, {}, 2, "x").warning is not None  # one rank asking for 4 threads on 2 CPUs


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"), reason="taskset")
def test_a_process_pinned_to_one_cpu_uses_one_thread(tmp_path: Path) -> None:
    """A real process under ``taskset -c 0``: os.cpu_count() still says every CPU, the rank must not."""
    script = (
        "import json, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "import torch\n"
        "from r2d2_hpc.config import TrainConfig\n"
        "from r2d2_hpc.train.dist import dist_env_from_environ\n"
        "from r2d2_hpc.train.setup import configure_process\n"
        "env = dist_env_from_environ(backend='gloo')\n"
        "plan = configure_process(TrainConfig(), env)\n"
        "print(json.dumps({'threads': torch.get_num_threads(), 'cpus': plan.cpus_available}))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "SUBMITIT_"))}
    environ |= {"PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    proc = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", script],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"threads": 1, "cpus": 1}
    assert "1 thread(s) per rank" in proc.stderr and "1 CPU(s) available (affinity mask)" in proc.stderr
    assert "threads on" not in proc.stderr  # one rank, one thread, one CPU: no warning
    # os.cpu_count() // 1 local rank would have chosen every CPU of the machine
