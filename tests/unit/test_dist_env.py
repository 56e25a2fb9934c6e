"""DistEnv from torchrun, Slurm, submitit-local and single-process environments; Heartbeat and failure messages."""

from __future__ import annotations

import json
import time

import pytest
import torch

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train import dist
from r2d2_hpc.train.dist import (
    DistEnv,
    Heartbeat,
    derived_port,
    describe_failure,
    dist_env_from_environ,
    expand_nodelist,
    parse_tasks_per_node,
)

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node7",
    "MASTER_PORT": "29500",
}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",  # srun's tasks have it; a batch script does not
}
# What submitit 1.5.4's LocalExecutor controller exports to task 1 of tasks_per_node=2 (local/local.py).
SUBMITIT_LOCAL = {
    "SUBMITIT_EXECUTOR": "local",
    "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_NODEID": "0",
    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
    "SUBMITIT_LOCAL_LOCALID": "1",
    "SUBMITIT_LOCAL_GLOBALID": "1",
    "SUBMITIT_LOCAL_JOB_ID": "4242",
}


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_torchrun(no_cuda: None) -> None:
    env = dist_env_from_environ(TORCHRUN)
    assert env == DistEnv(
        rank=3,
        world_size=8,
        local_rank=1,
        local_world_size=2,
        master_addr="node7",
        master_port=29500,
        num_nodes=4,
        backend="gloo",
        device="cpu",
        source="torchrun",
        job_id=None,
    )
    assert not env.is_main


def test_torchrun_wins_over_slurm_and_keeps_the_job_id(no_cuda: None) -> None:
    env = dist_env_from_environ({**SLURM, **TORCHRUN})
    assert (env.source, env.rank, env.master_addr, env.job_id) == ("torchrun", 3, "node7", "123456")


def test_slurm(no_cuda: None) -> None:
    env = dist_env_from_environ(SLURM, backend="gloo")
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.num_nodes, env.master_addr, env.job_id, env.source) == (2, "gpu07", "123456", "slurm")
    assert env.master_port == 15000 + (123456 * 8) % 17768 == 25408


def test_slurm_master_variables_win(no_cuda: None) -> None:
    env = dist_env_from_environ({**SLURM, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "31111"})
    assert (env.master_addr, env.master_port) == ("10.0.0.9", 31111)


@pytest.mark.parametrize(
    ("tasks_per_node", "node_id", "local_world"),
    [("3,1", "0", 3), ("3,1", "1", 1), ("2(x2)", "1", 2), ("1(x2),2", "2", 2)],
)
def test_slurm_uneven_tasks_per_node(
    no_cuda: None, tasks_per_node: str, node_id: str, local_world: int
) -> None:
    nodes = len(parse_tasks_per_node(tasks_per_node))
    environ = {
        **SLURM,
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": node_id,
        "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_NNODES": str(nodes),
    }
    env = dist_env_from_environ(environ)
    assert (env.local_world_size, env.num_nodes) == (local_world, nodes)


def test_slurm_step_variables_and_ntasks_per_node(no_cuda: None) -> None:
    environ = {
        "SLURM_PROCID": "2",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "2",
        "SLURM_NODELIST": "cn-[3-4]",
        "SLURM_STEP_NODELIST": "cn-4,cn-3",
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "3",
    }
    env = dist_env_from_environ(environ)
    assert (env.world_size, env.local_world_size, env.master_addr, env.master_port) == (4, 2, "cn-4", 15619)


@pytest.mark.parametrize(
    "step", [None, "4294967291", "batch", "4294967290"], ids=["none", "batch-id", "name", "interactive"]
)
def test_multi_task_slurm_job_without_srun_fails_naming_srun(no_cuda: None, step: str | None) -> None:
    # What a batch script of `sbatch --ntasks=2` sees: SLURM_PROCID=0 and SLURM_NTASKS=2, but no srun step.
    environ = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"} | {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
    }
    environ |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2", "SLURM_NNODES": "1"}
    if step is not None:
        environ["SLURM_STEP_ID"] = step
    with pytest.raises(ConfigError, match=r"SLURM_NTASKS=2: .*rank 0 of 2 .*srun python -m r2d2_hpc.train"):
        dist_env_from_environ(environ)
    one_task = environ | {"SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1"}
    assert dist_env_from_environ(one_task).world_size == 1  # a one-task batch script may run it directly


def test_derived_ports_lie_below_the_ephemeral_range_and_differ_per_step_and_job() -> None:
    ports = {(job, step): derived_port(str(job), str(step)) for job in range(1000, 3221) for step in range(8)}
    assert all(15000 <= port < 32768 for port in ports.values())
    assert len(set(ports.values())) == len(ports)  # 2,221 consecutive jobs x 8 concurrent steps: all distinct
    assert derived_port("1234", None) == derived_port("1234", "0") == derived_port("1234", "4294967291")
    assert derived_port("1234_7", "0") == derived_port("12347", "0")  # array task ids: the digits


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-04,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu5"]),
        ("node-[1-3]", ["node-1", "node-2", "node-3"]),
        ("cpu5,gpu[9-10]", ["cpu5", "gpu9", "gpu10"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
        ("login", ["login"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-04", "gpu]1[", "gpu[a-b]", "gpu[[1]]", ""])
def test_bad_nodelist(nodelist: str) -> None:
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(nodelist)


@pytest.mark.parametrize(("text", "counts"), [("2(x3)", [2, 2, 2]), ("4,2", [4, 2]), ("2(x2),1", [2, 2, 1])])
def test_tasks_per_node(text: str, counts: list[int]) -> None:
    assert parse_tasks_per_node(text) == counts


def test_bad_tasks_per_node() -> None:
    with pytest.raises(ConfigError, match=r"SLURM_TASKS_PER_NODE='2\(3\)'"):
        parse_tasks_per_node("2(3)")


def test_submitit_local(no_cuda: None) -> None:
    env = dist_env_from_environ(SUBMITIT_LOCAL)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.num_nodes) == (1, 2, 1, 2, 1)
    assert (env.master_addr, env.master_port, env.source, env.job_id) == (
        "127.0.0.1",
        15000 + 4242 * 8 % 17768,
        "submitit",
        None,
    )


def test_submitit_local_inside_a_slurm_allocation(no_cuda: None) -> None:
    env = dist_env_from_environ({**SLURM, **SUBMITIT_LOCAL})  # the tasks inherit the allocation's SLURM_*
    assert (env.source, env.rank, env.world_size, env.master_addr) == ("submitit", 1, 2, "127.0.0.1")


def test_single_process(no_cuda: None) -> None:
    env = dist_env_from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes, env.source) == (0, 1, 0, 1, "single")
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536
    assert env.is_main and env.device == "cpu" and env.job_id is None


def test_nccl_without_cuda(no_cuda: None) -> None:
    with pytest.raises(ConfigError, match=r"train.backend=nccl needs CUDA.*train.backend=gloo"):
        dist_env_from_environ({}, backend="nccl")


def test_auto_backend_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 4)
    env = dist_env_from_environ(TORCHRUN)
    assert (env.backend, env.device) == ("nccl", "cuda:1")
    assert dist_env_from_environ(TORCHRUN, backend="gloo").device == "cpu"


def test_one_visible_gpu_per_task_is_device_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 1)
    assert dist_env_from_environ(TORCHRUN).device == "cuda:0"


def test_too_few_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2)
    with pytest.raises(ConfigError, match="local rank 3 of 4 but only 2 GPU"):
        dist_env_from_environ({**TORCHRUN, "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({**TORCHRUN, "RANK": "8"}, r"RANK=8 must be in \[0, WORLD_SIZE=8\)"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 must be in \[0, LOCAL_WORLD_SIZE=2\)"),
        ({"RANK": "0"}, "WORLD_SIZE is missing"),
        ({**TORCHRUN, "WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not an integer"),
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, "set MASTER_PORT"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
        ({**SLURM, "SLURM_PROCID": "8"}, r"SLURM_PROCID=8 must be in \[0, SLURM_NTASKS=8\)"),
        (
            {**SLURM, "SLURM_TASKS_PER_NODE": "4,2"},
            "SLURM_TASKS_PER_NODE='4,2' adds up to 6 tasks but SLURM_NTASKS=8",
        ),
        ({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS is not"),
        ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID is not"),
        ({**SLURM, "SLURM_JOB_NODELIST": "gpu[1-"}, "SLURM_JOB_NODELIST='gpu\\[1-' has unbalanced"),
    ],
)
def test_inconsistent_variables(no_cuda: None, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dist_env_from_environ(environ)


def test_unknown_backend() -> None:
    with pytest.raises(ConfigError, match="Valid choices are: auto, nccl, gloo"):
        dist_env_from_environ({}, backend="mpi")


# --------------------------------------------------------------------------------------------- heartbeat
class DictStore:
    """The TCPStore calls Heartbeat uses, in memory (keys that are missing make wait/multi_get fail at once)."""

    def __init__(self, broken: bool = False) -> None:
        self.data: dict[str, bytes] = {}
        self.broken = broken

    def _check_alive(self) -> None:
        if self.broken:
            raise RuntimeError("Connection reset by peer")

    def set(self, key: str, value: str) -> None:
        self._check_alive()
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        self._check_alive()
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        self._check_alive()
        return all(k in self.data for k in keys)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        self._check_alive()
        if key not in self.data and expected == "":
            self.data[key] = desired.encode()
        return self.data[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._check_alive()
        return [self.data[k] for k in keys]


def _env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank, world, rank, world, "127.0.0.1", 29999, 1, "gloo", "cpu", "torchrun", None)


def _record(store: DictStore, rank: int, step: int, age_s: float, done: bool = False) -> None:
    value = {"step": step, "time": time.time() - age_s, "done": done, "host": "n1", "pid": 100 + rank}
    store.data[f"r2d2/heartbeat/{rank}"] = json.dumps(value).encode()


def test_heartbeat_publishes_and_names_stale_missing_and_finished_ranks() -> None:
    store = DictStore()
    hb = Heartbeat(_env(0, 5), store=store, interval_s=0.05, stale_after_s=2.0)
    try:
        hb.beat(7)
        time.sleep(0.2)
        own = json.loads(store.data["r2d2/heartbeat/0"])
        assert own["step"] == 7 and not own["done"]
        _record(store, 1, 7, age_s=0.1)  # alive
        _record(store, 2, 6, age_s=30.0)  # dead for 30 s
        _record(store, 4, 7, age_s=0.1, done=True)  # left early; rank 3 never beat
        reasons = hb.inspect()
        assert list(reasons) == [3, 2, 4]  # oldest first: never, 30 s ago, just now
        assert "stopped beating 30" in reasons[2] and "at step 6" in reasons[2] and "pid 102" in reasons[2]
        assert "never sent a heartbeat" in reasons[3] and "left the job at step 7" in reasons[4]
        assert hb.suspects() == [2, 3, 4]
    finally:
        hb.close()
    assert json.loads(store.data["r2d2/heartbeat/0"])["done"] is True


def test_heartbeat_names_a_rank_that_is_behind() -> None:
    store = DictStore()
    hb = Heartbeat(_env(1, 2), store=store, interval_s=0.05, stale_after_s=5.0)
    try:
        _record(store, 0, 9, age_s=0.0)
        hb.beat(10)
        assert hb.suspects() == []  # just stepped: the others have had no time to publish yet
        time.sleep(0.15)
        _record(store, 0, 9, age_s=0.0)
        assert hb.suspects() == [0] and "behind at step 9 (this rank: 10)" in hb.inspect()[0]
    finally:
        hb.close()


def test_unreachable_store_names_rank_zero() -> None:
    store = DictStore()
    hb = Heartbeat(_env(1, 2), store=store, interval_s=0.05)
    store.broken = True
    try:
        assert hb.suspects() == [0]
        assert "rank 0 most likely died" in hb.inspect()[0]
    finally:
        hb.close()


def test_describe_failure_names_the_dead_rank_the_timeout_and_the_fix() -> None:
    store = DictStore()
    hb = Heartbeat(_env(0, 3), store=store, interval_s=0.05, stale_after_s=1.0)
    try:
        hb.beat(12)
        _record(store, 1, 12, age_s=0.0)
        _record(store, 2, 11, age_s=40.0)
        exc = RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:4321")
        started = time.monotonic()
        message = describe_failure(exc, hb, _env(0, 3), timeout_s=20)
        assert time.monotonic() - started < 1.0  # a stale rank is named at once, no waiting
    finally:
        hb.close()
    assert "Suspect rank(s): 2 (this rank was at step 12)" in message
    assert "rank 2 stopped beating 40" in message and "at step 11" in message
    assert "another rank most likely crashed" in message
    assert "train.dist_timeout_s=20 s" in message and "read the log of rank 2" in message
    assert "raise train.dist_timeout_s" in message


def test_describe_failure_without_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dist._state, "timeout_s", 300.0)
    message = describe_failure(TimeoutError("Socket Timeout"), None, _env(1, 2))
    assert "cannot be named" in message and "train.dist_timeout_s=300 s" in message
    assert "whole process-group timeout" in message
