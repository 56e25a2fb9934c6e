"""Two real gloo processes: RNG states gathered on rank 0, and a SIGKILLed rank named by the survivor.

The test file is also the worker script: ``python test_dist_support.py <rank> <port> <out_dir>``. One pair of
processes serves both tests (a module fixture) to keep the file fast on small machines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

TIMEOUT_S = 20.0  # the process-group timeout of the workers
KILL_AT_STEP = 3


def _worker(rank: int, port: int, out_dir: Path) -> None:
    import torch.distributed as tdist

    from r2d2_hpc.train.checkpoint import gather_rng_states, restore_rng_state
    from r2d2_hpc.train.dist import (
        Heartbeat,
        cpu_group,
        describe_failure,
        dist_env_from_environ,
        init_process_group,
    )

    environ = {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    env = dist_env_from_environ(environ, backend="gloo")
    group = init_process_group(env, TIMEOUT_S)
    result: dict[str, Any] = {
        "rank": rank,
        "backend": tdist.get_backend(),
        "cpu_group_backend": tdist.get_backend(group),
        "cpu_group_size": tdist.get_world_size(group),
        "world_size": tdist.get_world_size(),
    }
    nccl_side = cpu_group("nccl", TIMEOUT_S)  # what an NCCL world gets: a real new gloo group of every rank
    result["nccl_side_group"] = [
        tdist.get_backend(nccl_side),
        tdist.get_world_size(nccl_side),
        nccl_side is tdist.group.WORLD,
    ]
    from r2d2_hpc.models import build_model
    from r2d2_hpc.train.setup import model_flops_on_rank0

    # each rank builds a different model: a count made on rank 1 would differ from rank 0's
    tiny = build_model("unet", 1, 2, 2, depth=1, base_width=4 * (rank + 1))
    result["flops"] = model_flops_on_rank0(tiny, (1, 16, 16), env, group)
    from r2d2_hpc.errors import ConfigError
    from r2d2_hpc.train.devices import check_distinct_gpus

    check_distinct_gpus(rank, f"GPU-{rank}", group, 2)  # distinct: passes
    try:
        check_distinct_gpus(rank, "GPU-same", group, 2)  # two ranks of one host on one GPU
    except ConfigError as exc:
        result["same_gpu"] = str(exc)
    _seed(100 + rank)
    states = gather_rng_states(env, group)
    if rank == 0:
        result["draws"] = []
        for state in states:
            restore_rng_state(state)
            result["draws"].append(_draws())
    else:
        result["gathered"] = states
    (out_dir / f"rank{rank}.flops.json").write_text(json.dumps(result["flops"]))
    heartbeat = Heartbeat(env, interval_s=0.2, stale_after_s=1.5)
    value = torch.ones(1)
    for step in range(1, 10):
        if rank == 1 and step == KILL_AT_STEP:
            time.sleep(0.6)  # let the heartbeat publish the last completed step, then die without a trace
            os.kill(os.getpid(), signal.SIGKILL)
        entered = time.monotonic()
        try:
            tdist.all_reduce(value)
        except Exception as exc:
            failed_s = time.monotonic() - entered
            result.update(
                error=f"{type(exc).__name__}: {exc}",
                failed_after_s=failed_s,
                failed_at_step=step,
                message=describe_failure(exc, heartbeat, env),
                described_after_s=time.monotonic() - entered,
            )
            break
        heartbeat.beat(step)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # the peer is gone: skip a teardown that could wait for it


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws() -> list[Any]:
    return [torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from r2d2_hpc.train.dist import free_port

    out_dir = tmp_path_factory.mktemp("dist_support")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two ranks did not finish within 60 s")
    files = {rank: out_dir / f"rank{rank}.json" for rank in range(2)}
    logs = "\n".join(
        f"--- rank {r} (exit {p.returncode}):\n{o[-3000:]}"
        for r, (p, o) in enumerate(zip(procs, outputs, strict=True))
    )
    assert files[0].exists(), logs
    return {
        "rank0": json.loads(files[0].read_text()),
        "returncodes": [p.returncode for p in procs],
        "wall_s": time.monotonic() - started,
        "out_dir": out_dir,
        "logs": logs,
    }


@pytest.mark.distributed
def test_gather_rng_states_returns_every_rank_on_rank_zero(two_ranks: dict[str, Any]) -> None:
    rank0 = two_ranks["rank0"]
    assert (rank0["backend"], rank0["world_size"]) == ("gloo", 2)
    assert (rank0["cpu_group_backend"], rank0["cpu_group_size"]) == ("gloo", 2)  # never NCCL point-to-point
    assert rank0["nccl_side_group"] == ["gloo", 2, False]
    expected = []
    for rank in range(2):
        _seed(100 + rank)
        expected.append(json.loads(json.dumps(_draws())))
    assert rank0["draws"] == expected  # each state reproduces its own rank's next numbers
    assert rank0["draws"][0] != rank0["draws"][1]


@pytest.mark.distributed
def test_flops_are_counted_on_rank_zero_and_shared(two_ranks: dict[str, Any]) -> None:
    from r2d2_hpc.models import build_model, flops_per_sample

    rank0_model = build_model("unet", 1, 2, 2, depth=1, base_width=4)
    expected = flops_per_sample(rank0_model, (1, 16, 16))
    rank1_own = flops_per_sample(build_model("unet", 1, 2, 2, depth=1, base_width=8), (1, 16, 16))
    assert expected != rank1_own
    counts = [json.loads((two_ranks["out_dir"] / f"rank{r}.flops.json").read_text()) for r in range(2)]
    assert counts == [expected, expected], two_ranks["logs"]


@pytest.mark.distributed
def test_two_ranks_on_one_gpu_fail_naming_them(two_ranks: dict[str, Any]) -> None:
    message = two_ranks["rank0"].get("same_gpu", "")
    assert message.startswith("rank 0: ranks [0, 1] on ") and "all use GPU GPU-same" in message, two_ranks[
        "logs"
    ]
    assert "--gpus-per-task=1" in message


@pytest.mark.distributed
def test_a_killed_rank_is_named_by_the_survivor(two_ranks: dict[str, Any]) -> None:
    rank0, logs = two_ranks["rank0"], two_ranks["logs"]
    assert two_ranks["returncodes"] == [0, -signal.SIGKILL], logs
    assert rank0["failed_at_step"] == KILL_AT_STEP, logs
    assert rank0["failed_after_s"] < TIMEOUT_S / 2, (
        "gloo should notice the closed connection long before the timeout"
    )
    assert rank0["described_after_s"] < TIMEOUT_S / 2
    message = rank0["message"]
    assert "Suspect rank(s): 1 " in message, message
    assert "rank 1 stopped beating" in message and f"at step {KILL_AT_STEP - 1}" in message, message
    assert "train.dist_timeout_s=20 s" in message and "read the log of rank 1" in message, message
    assert two_ranks["wall_s"] < 40


@pytest.mark.distributed
def test_submitit_local_executor_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What submitit's LocalExecutor really exports (tasks_per_node=2) reads as two ranks of one job."""
    submitit = pytest.importorskip("submitit")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # the tasks inherit this process' environment
    from r2d2_hpc.train.dist import derived_port, dist_env_from_environ

    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, timeout_min=2)
    job = executor.submit(dist_env_from_environ, None, "gloo")  # an importable callable, run in each task
    envs = sorted(job.results(), key=lambda e: e.rank)
    assert [(e.rank, e.local_rank, e.world_size, e.local_world_size) for e in envs] == [
        (0, 0, 2, 2),
        (1, 1, 2, 2),
    ]
    assert {(e.source, e.master_addr, e.master_port, e.num_nodes, e.job_id) for e in envs} == {
        ("submitit", "127.0.0.1", derived_port(job.job_id), 1, None)
    }


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
