"""The local Slurm cluster itself, for real: submitit jobs, a two-task gloo group, accounting, sbatch --test-only."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from r2d2_hpc.train.dist import derived_port

pytestmark = pytest.mark.slurm


def _square_slowly(x: int, sleep_s: float) -> tuple[int, str, str]:
    time.sleep(sleep_s)  # long enough for sacct to record a non-zero Elapsed
    return x * x, os.environ["SLURM_JOB_ID"], os.environ["SLURM_JOB_PARTITION"]


def _all_reduce_rank() -> dict:
    import socket

    import torch
    import torch.distributed as tdist

    from r2d2_hpc.train.dist import destroy_process_group, dist_env_from_environ, init_process_group

    torch.set_num_threads(1)  # ranks share the machine's CPUs
    env = dist_env_from_environ(backend="gloo")
    init_process_group(env, timeout_s=60)
    try:
        total = torch.tensor([float(env.rank + 1)])
        tdist.all_reduce(total)
        group_size = tdist.get_world_size()
    finally:
        destroy_process_group()
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "group_size": group_size,
        "sum": total.item(),
        "source": env.source,
        "job_id": env.job_id,
        "addr": env.master_addr,
        "port": env.master_port,
        "host": socket.gethostname(),
        "nodes": env.num_nodes,
    }


def test_two_node_job_forms_a_gloo_group_across_hosts(slurm_cluster, job_dir: Path) -> None:
    if len(slurm_cluster.nodes) < 2:
        pytest.skip("needs a cluster of 2 nodes (R2D2_SLURM_NODES=2)")
    job = slurm_cluster.executor(job_dir, nodes=2, tasks_per_node=1).submit(_all_reduce_rank)

    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert (r["world_size"], r["group_size"], r["sum"], r["nodes"]) == (
            2,
            2,
            3.0,
            2,
        )  # 1 + 2 from the ranks
        assert (r["source"], r["job_id"]) == ("slurm", job.job_id)
    # Each task ran on its own node, under that node's name, and met at the first host of the node list.
    assert [r["host"] for r in results] == list(slurm_cluster.nodes[:2])
    assert {r["addr"] for r in results} == {slurm_cluster.nodes[0]}
    assert results[0]["port"] == results[1]["port"] == derived_port(job.job_id, "0") < 32768
    row = slurm_cluster.wait_sacct(job.job_id)
    assert (row["State"], row["NNodes"], row["NodeList"]) == ("COMPLETED", "2", "node[1-2]")
    rows = {
        r["JobID"]: r
        for r in slurm_cluster.sacct(job.job_id, fields=("JobID", "State", "NTasks", "NNodes"), steps=True)
    }
    assert (rows[f"{job.job_id}.0"]["NTasks"], rows[f"{job.job_id}.0"]["NNodes"]) == (
        "2",
        "2",
    )  # one srun step


MINIMAL_SCRIPT = """#!/bin/bash
#SBATCH --job-name=r2d2-test-only
#SBATCH --ntasks=1
#SBATCH --time=00:01:00
srun true
"""


def _test_only(script: Path, *options: str) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--test-only", *options, str(script)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def test_sbatch_test_only_accepts_a_minimal_script(slurm_cluster, job_dir: Path) -> None:
    script = job_dir / "minimal.sbatch"
    script.write_text(MINIMAL_SCRIPT)

    done = _test_only(script, f"--partition={slurm_cluster.partition}")

    assert done.returncode == 0, done.stderr
    expected = f"using 1 processors on nodes {slurm_cluster.node} in partition {slurm_cluster.partition}"
    assert expected in done.stderr


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--cpus-per-task={cpus_plus_one}", "Requested node configuration is not available"),
        ("--mem={mem_plus_one}", "Requested node configuration is not available"),
        ("--partition=no-such-partition", "invalid partition"),
    ],
    ids=["too-many-cpus", "too-much-memory", "unknown-partition"],
)
def test_sbatch_test_only_rejects_an_impossible_job(
    slurm_cluster, job_dir: Path, option: str, message: str
) -> None:
    script = job_dir / "impossible.sbatch"
    script.write_text(MINIMAL_SCRIPT)
    option = option.format(cpus_plus_one=slurm_cluster.num_cpus + 1, mem_plus_one=slurm_cluster.mem_mib + 1)

    done = _test_only(script, option)

    assert done.returncode != 0
    assert message.lower() in done.stderr.lower()
    assert "to start at" not in done.stderr
