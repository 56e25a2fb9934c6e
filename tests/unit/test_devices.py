"""Each rank's GPU under every Slurm binding mode, from the variables each mode sets (no GPU needed).

For each mode the test builds what Slurm exports to each task of a 4-GPU node (``CUDA_VISIBLE_DEVICES``,
``SLURM_STEP_GPUS``, ``SLURM_GPUS_PER_TASK``, ``SLURM_DISTRIBUTION``) and checks that the ranks of the node use
distinct physical GPUs. Which GPU CUDA really opens is only checked on a machine with GPUs (not here).
"""

from __future__ import annotations

import pytest
import torch

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train.devices import choose_cuda_index
from r2d2_hpc.train.dist import dist_env_from_environ

NODE = {"SLURM_STEP_GPUS": "0,1,2,3", "SLURM_GPUS_ON_NODE": "4"}


def _physical(mode_env: list[dict[str, str]]) -> list[str]:
    """The physical GPU each local rank uses: its CUDA index mapped through its CUDA_VISIBLE_DEVICES."""
    used = []
    world = len(mode_env)
    for local_rank, env in enumerate(mode_env):
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        index, _ = choose_cuda_index(local_rank, world, len(visible), env)
        used.append(visible[index])
    return used


def _tasks(visible_per_task: list[str], **extra: str) -> list[dict[str, str]]:
    return [{**NODE, **extra, "CUDA_VISIBLE_DEVICES": v} for v in visible_per_task]


@pytest.mark.parametrize(
    ("mode", "tasks", "expected"),
    [
        # srun --gpus-per-task=1: each task sees its own GPU
        ("gpus-per-task=1", _tasks(["0", "1", "2", "3"], SLURM_GPUS_PER_TASK="1"), ["0", "1", "2", "3"]),
        # srun --gpus-per-task=2, 2 tasks: each owns two, uses the first
        ("gpus-per-task=2", _tasks(["0,1", "2,3"], SLURM_GPUS_PER_TASK="2"), ["0", "2"]),
        # --gpus-per-node=4, --gpu-bind=none: every task sees the node's 4 GPUs
        ("gpus-per-node", _tasks(["0,1,2,3"] * 4, SLURM_GPUS_PER_NODE="4"), ["0", "1", "2", "3"]),
        # --gpu-bind=closest, 2 sockets, tasks in blocks: tasks 0,1 on socket 0 (GPUs 0,1), 2,3 on socket 1
        ("closest-block", _tasks(["0,1", "0,1", "2,3", "2,3"]), ["0", "1", "2", "3"]),
        # --gpu-bind=closest, tasks cyclic over the sockets (srun's default second level)
        ("closest-cyclic", _tasks(["0,1", "2,3", "0,1", "2,3"]), ["0", "2", "1", "3"]),
        # 8 tasks on 8 GPUs, 2 sockets, closest, layout declared: both layouts fit some ranks, it decides
        (
            "closest-8-block",
            [
                {
                    **NODE,
                    "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7",
                    "SLURM_DISTRIBUTION": "block:block",
                    "CUDA_VISIBLE_DEVICES": v,
                }
                for v in ["0,1,2,3"] * 4 + ["4,5,6,7"] * 4
            ],
            ["0", "1", "2", "3", "4", "5", "6", "7"],
        ),
        (
            "closest-8-cyclic",
            [
                {
                    **NODE,
                    "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7",
                    "SLURM_DISTRIBUTION": "block:cyclic",
                    "CUDA_VISIBLE_DEVICES": v,
                }
                for v in ["0,1,2,3", "4,5,6,7"] * 4
            ],
            ["0", "4", "1", "5", "2", "6", "3", "7"],
        ),
        # --gpu-bind=map_gpu:3,2,1,0: one GPU per task, in the given order
        ("map_gpu", _tasks(["3", "2", "1", "0"]), ["3", "2", "1", "0"]),
        # job allocated physical GPUs 4-7 (cgroup renumbers to 0-3), closest binding, blocks
        (
            "closest-renumbered",
            [{"SLURM_STEP_GPUS": "4,5,6,7", "CUDA_VISIBLE_DEVICES": v} for v in ["0,1", "0,1", "2,3", "2,3"]],
            ["0", "1", "2", "3"],
        ),
    ],
)
def test_every_rank_of_a_node_gets_its_own_gpu(
    mode: str, tasks: list[dict[str, str]], expected: list[str]
) -> None:
    assert _physical(tasks) == expected, mode


def test_too_many_ranks_for_the_gpus_names_the_binding_to_ask_for() -> None:
    with pytest.raises(ConfigError, match=r"local rank 3 of 4 but only 2 GPU\(s\).*--gpus-per-task=1"):
        choose_cuda_index(3, 4, 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(ConfigError, match="3 ranks would share 2 GPUs"):  # closest with 6 ranks on 4 GPUs
        choose_cuda_index(0, 6, 2, {**NODE, "CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(ConfigError, match="cannot tell which local ranks share"):  # layout needed, not given
        choose_cuda_index(5, 8, 4, {"SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})


def test_closest_binding_through_dist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a rank under `srun --gpu-bind=closest` sees: 2 of the node's 4 GPUs (torch counts them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # CUDA_VISIBLE_DEVICES=2,3 shows two devices
    slurm = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "3",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "4",
        "SLURM_JOB_NODELIST": "gpu01",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "CUDA_VISIBLE_DEVICES": "2,3",
        **NODE,
    }
    assert dist_env_from_environ(slurm).device == "cuda:1"  # rank 3 takes the second GPU of its socket
