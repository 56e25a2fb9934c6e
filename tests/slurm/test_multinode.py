"""Multi-node training on the real local Slurm cluster (two nodes, node1 and node2, one CPU each): world size 2
across hosts, real partition preemption (SIGTERM), a time limit, a rank killed on node2, a crash after a
preemption, rendezvous ports per job step, and a multi-task job started without srun (issue 10).

One training config (``_train``) serves the uninterrupted 2-node run, its 2-rank single-node twin (local
processes) and both preempted runs, so every one of them must end with the very same weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from r2d2_hpc.config import DataConfig, LaunchConfig, LauncherConfig, StudyConfig, TrainConfig
from r2d2_hpc.launch.accounting import store_accounting
from r2d2_hpc.launch.executors import run_local, submit_slurm
from r2d2_hpc.launch.plan import model_configs, plan, run_config
from r2d2_hpc.launch.record import Study, wait_all
from r2d2_hpc.launch.sbatch import render_study
from r2d2_hpc.train.dist import derived_port
from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.slurm
TINY_UNET = {"name": "unet", "spatial_dims": 2, "depth": 2, "base_width": 4, "dropout_p": 0.2}
STEPS = 120  # long enough to preempt in the middle, short enough for CI


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=5, val_case="phantom_002"
    )


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster):
    """The cluster, when it has 2 nodes and a high partition (skipped otherwise; failed with R2D2_REQUIRE_SLURM=1)."""
    if len(slurm_cluster.nodes) < 2 or slurm_cluster.high_partition is None:
        reason = (
            f"needs 2 nodes and a high partition, the cluster has {list(slurm_cluster.nodes)} and "
            f"{slurm_cluster.high_partition}: restart it with R2D2_SLURM_NODES=2 (the default)"
        )
        if os.environ.get("R2D2_REQUIRE_SLURM") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return slurm_cluster


def _train(**overrides: Any) -> TrainConfig:
    settings = {
        "max_steps": STEPS,
        "global_batch": 4,
        "num_workers": 0,
        "eval_every_steps": 0,
        "timing_warmup_steps": 0,
        "threads_per_rank": 1,
        "checkpoint_every_steps": 50,
        "deterministic": True,
        "dist_timeout_s": 60.0,
    }
    return TrainConfig(**(settings | overrides))  # type: ignore[arg-type]


def _launch_config(
    cluster, shards: Path, study_dir: Path, launcher: str = "slurm", **train: Any
) -> LaunchConfig:
    return LaunchConfig(
        data=DataConfig(name="msd", root=".", shards=str(shards)),
        model=dict(TINY_UNET),
        train=_train(**train),
        launcher=LauncherConfig(
            name=launcher,
            partition=cluster.partition,
            cpus_per_task=1,
            time_min=10,
            tasks_per_node=1,
            signal_delay_s=30,
            python=sys.executable,
            submit=launcher == "sbatch",
        ),
        study=StudyConfig(name="t", scales=[2], scale_unit="nodes", dir=str(study_dir), report=False),
    )


def _study(lc: LaunchConfig) -> tuple[Study, dict[str, Any]]:
    runs = plan(lc, model_configs(lc, explicit_model=True))
    study_dir = Path(lc.study.dir)
    configs = {r.name: run_config(lc, lc.model, study_dir, r) for r in runs}
    return Study.create(study_dir, runs, lc.launcher.name, {}), configs


def _steps_logged(run_dir: Path, rank: int = 0) -> int:
    log = run_dir / "timing" / f"rank{rank}.jsonl"
    try:
        records = read_jsonl(log) if log.exists() else []
    except ValueError:  # a line being written
        return 0
    return max((r["step"] for r in records if r.get("type") == "step"), default=0)


def _wait_for_step(run_dir: Path, step: int, job_id: str, timeout_s: float = 240) -> int:
    deadline = time.monotonic() + timeout_s
    while (done := _steps_logged(run_dir)) < step:
        state = _squeue_state(job_id)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state} at step {done}"
        assert time.monotonic() < deadline, f"{run_dir} never reached step {step} (at {done})"
        time.sleep(0.2)
    return done


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip() or "GONE"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")["model"]


def _assert_same_weights(ours: Path, theirs: Path) -> None:
    a, b = _weights(ours), _weights(theirs)
    assert a.keys() == b.keys()
    for name, value in b.items():
        assert torch.equal(a[name], value), f"{name} of {ours} differs from {theirs}"


def _headers(run_dir: Path, rank: int) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "timing" / f"rank{rank}.jsonl") if r.get("type") == "header"]


def _preempt(cluster, job_id: str, run_dir: Path) -> int:
    """Submits a 2-node job to the high partition (it needs the nodes the low job holds); returns the step the
    preempted job had logged then."""
    at = _steps_logged(run_dir)
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", cluster.high_partition, "-N2", "-J", "r2d2-high", "-o", "/dev/null",
         "--wrap", "sleep 2"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    row = cluster.wait_sacct(high, states=("COMPLETED",), timeout_s=120)
    assert row["NodeList"] == "node[1-2]"
    return at


@pytest.fixture(scope="module")
def reference(two_nodes, shards: Path, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs: 2 ranks as local processes, and 2 nodes through submitit (both at once)."""
    base = tmp_path_factory.mktemp("reference")
    local_lc = _launch_config(two_nodes, shards, base / "local", launcher="local")
    local_lc.study.scale_unit = "ranks"
    local_study, local_configs = _study(local_lc)
    slurm_lc = _launch_config(two_nodes, shards, base / "slurm")
    study, configs = _study(slurm_lc)
    jobs = submit_slurm(study, slurm_lc, configs)
    run_local(local_study, local_lc, local_configs)  # meanwhile, on this machine
    wait_all(study, jobs)
    assert [r.state for r in local_study.runs] == ["COMPLETED"], local_study.summary()
    assert [r.state for r in study.runs] == ["COMPLETED"], study.summary()
    return {
        "local": base / "local" / local_study.runs[0].run_dir,
        "slurm": base / "slurm" / study.runs[0].run_dir,
        "job_id": study.runs[0].job_id,
    }


def test_two_node_job_trains_across_hosts_like_a_single_node_run(two_nodes, reference) -> None:
    run_dir = reference["slurm"]
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["world_size"], result["num_nodes"], result["steps"]) == (
        "completed", 2, 2, STEPS
    )  # fmt: skip
    (h0,), (h1,) = _headers(run_dir, 0), _headers(run_dir, 1)
    assert (h0["host"], h1["host"]) == ("node1", "node2")
    assert h0["slurm_job_id"] == h1["slurm_job_id"] == reference["job_id"]
    local = _headers(reference["local"], 0)[0]
    assert (local["world_size"], local["nodes"]) == (2, 1)
    _assert_same_weights(run_dir, reference["local"])


def _check_preempted_run(cluster, run_dir: Path, job_id: str, preempted_at: int, reference: dict) -> None:
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["steps"], result["attempts"]) == ("completed", STEPS, 2)
    resumed = [h["resumed_at_step"] for h in _headers(run_dir, 0)]
    lines = [json.loads(x) for x in (run_dir / "timing" / "rank0.jsonl").read_text().splitlines()]
    ends = [(ln["step"], ln.get("status")) for ln in lines if ln["type"] == "end"]
    # The first attempt stopped at a step boundary after the SIGTERM and checkpointed there; the second resumed
    # from exactly that step (not from an earlier periodic checkpoint). The stop step may be any agreed step,
    # a multiple of train.checkpoint_every_steps included.
    assert ends[0][1] == "preempted" and preempted_at <= ends[0][0] < STEPS, ends
    assert resumed[0] is None and resumed[1] == ends[0][0], (resumed, ends)
    assert cluster.wait_sacct(job_id)["State"] == "COMPLETED"  # sacct lags the controller
    states = [r["State"] for r in cluster.sacct(job_id, fields=("JobID", "State"), extra=("-D",))]
    assert states == ["REQUEUED", "COMPLETED"], states  # requeued by itself within GraceTime, not PREEMPTED
    _assert_same_weights(run_dir, reference["slurm"])


def test_preempted_submitit_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(
    two_nodes, shards: Path, reference, tmp_path: Path
) -> None:
    lc = _launch_config(two_nodes, shards, tmp_path / "study")
    study, configs = _study(lc)
    jobs = submit_slurm(study, lc, configs)
    run_dir = tmp_path / "study" / study.runs[0].run_dir
    job_id = study.runs[0].job_id
    _wait_for_step(run_dir, 20, job_id)
    preempted_at = _preempt(two_nodes, job_id, run_dir)
    wait_all(study, jobs)
    assert study.runs[0].state == "COMPLETED", study.summary()
    _check_preempted_run(two_nodes, run_dir, job_id, preempted_at, reference)


def test_preempted_sbatch_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(
    two_nodes, shards: Path, reference, tmp_path: Path
) -> None:
    lc = _launch_config(two_nodes, shards, tmp_path / "study", launcher="sbatch")
    study, configs = _study(lc)
    render_study(study, lc, configs)
    run_dir = tmp_path / "study" / study.runs[0].run_dir
    job_id = study.runs[0].job_id
    _wait_for_step(run_dir, 20, job_id)
    preempted_at = _preempt(two_nodes, job_id, run_dir)
    assert two_nodes.wait_sacct(job_id, states=("COMPLETED", "FAILED"), timeout_s=240)["State"] == "COMPLETED"
    _check_preempted_run(two_nodes, run_dir, job_id, preempted_at, reference)


def _rank_pids(job_id: str) -> dict[int, tuple[int, str]]:
    """rank -> (pid, node) of the Python task of each rank of the job's srun step, found through /proc (the nodes
    are namespaces of this machine, so their processes are visible here)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes()
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:  # gone, or not ours to read
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_STEP_ID", "").isdigit() and "python" in argv0:
            found.setdefault(int(env["SLURM_PROCID"]), (int(entry), env.get("SLURMD_NODENAME", "?")))
    return found


def _wait_for_ranks(job_id: str, count: int, timeout_s: float = 60) -> dict[int, tuple[int, str]]:
    deadline = time.monotonic() + timeout_s
    while len(pids := _rank_pids(job_id)) < count:
        assert time.monotonic() < deadline, f"job {job_id}: found only ranks {sorted(pids)}"
        time.sleep(0.2)
    return pids


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _signalled(pid: int, sig: signal.Signals) -> bool:
    """``sig`` is pending for the stopped process ``pid``, or Slurm already woke it up (it sends SIGCONT with the
    signal), or it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & (1 << (sig - 1))) or not fields["State"].strip().startswith("T")


def test_time_limit_signal_checkpoints_requeues_finishes_and_every_attempt_is_accounted(
    two_nodes, shards: Path, tmp_path: Path
) -> None:
    # --time=2 min, --signal=USR2@5: Slurm checks time limits every 30 s and sends the signal up to 60 s early
    # (a 1-minute job would be signalled at its first check, before it even trained): it comes 55-85 s in.
    # stop_check_every_steps=1: the ranks stop at the step after the signal (with the default 10 they may run
    # on to step 40, the end, and the rerun would have nothing left to train).
    lc = _launch_config(
        two_nodes, shards, tmp_path / "study", max_steps=40, dist_timeout_s=300.0, stop_check_every_steps=1
    )
    lc.launcher.time_min, lc.launcher.signal_delay_s = 2, 5
    study, configs = _study(lc)
    jobs = submit_slurm(study, lc, configs)
    job_id, run_dir = study.runs[0].job_id, tmp_path / "study" / study.runs[0].run_dir
    _wait_for_step(run_dir, 1, job_id)
    # Training this small would finish before the signal on any machine; freezing the ranks until the signal is
    # pending stands for a training longer than the limit (the signal and the limit are Slurm's own).
    pids = [pid for pid, _ in _wait_for_ranks(job_id, 2).values()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    while not all(_stopped(pid) for pid in pids):
        time.sleep(0.05)  # SIGSTOP takes effect asynchronously
    try:
        deadline = time.monotonic() + 120
        while not all(_signalled(pid, signal.SIGUSR2) for pid in pids):
            assert time.monotonic() < deadline, "no time-limit signal (USR2) within 120 s of a 2-minute job"
            time.sleep(0.2)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 90
    while not any(
        r["State"] == "REQUEUED" for r in two_nodes.sacct(job_id, ("JobID", "State"), extra=("-D",))
    ):
        assert time.monotonic() < deadline, "the job did not requeue itself after the time-limit signal"
        time.sleep(0.3)
    # The rerun gets room to finish (it would be signalled again before it could train 40 steps here).
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True, timeout=30)
    wait_all(study, jobs)
    assert study.runs[0].state == "COMPLETED", study.summary()
    store_accounting(study)

    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["steps"], result["attempts"]) == ("completed", 40, 2)
    assert 1 <= _headers(run_dir, 0)[1]["resumed_at_step"] < 40
    acct = json.loads((run_dir / "slurm.json").read_text())
    assert (acct["state"], acct["num_attempts"]) == ("COMPLETED", 2)
    assert [a["state"] for a in acct["attempts"]] == ["REQUEUED", "COMPLETED"]
    first, last = acct["attempts"]
    assert first["elapsed_s"] >= 45 and last["elapsed_s"] >= 1  # the first ran until the signal
    assert acct["elapsed_s"] == first["elapsed_s"] + last["elapsed_s"]
    assert acct["queue_wait_s"] == first["queue_wait_s"] + last["queue_wait_s"]
    assert last["queue_wait_s"] >= 9  # a requeued job is held for cred_expire (10 s)
    assert acct["cpu_hours"] == pytest.approx(2 * (first["elapsed_s"] + last["elapsed_s"]) / 3600)


def test_a_rank_killed_on_node2_is_named_by_the_survivor_and_the_other_runs_complete(
    two_nodes, shards: Path, tmp_path: Path
) -> None:
    lc = _launch_config(two_nodes, shards, tmp_path / "study", max_steps=20, dist_timeout_s=60.0)
    lc.study.scales = [1, 2]
    study, configs = _study(lc)
    doomed = next(r for r in study.runs if r.nodes == 2)
    configs[doomed.name].train = _train(max_steps=100_000, dist_timeout_s=60.0)  # killed long before the end
    jobs = submit_slurm(study, lc, configs)
    run_dir = tmp_path / "study" / doomed.run_dir
    _wait_for_step(run_dir, 3, doomed.job_id, timeout_s=300)
    ranks = _wait_for_ranks(doomed.job_id, 2)
    pid, node = ranks[1]
    assert node == "node2"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while _squeue_state(doomed.job_id) != "GONE":
        assert time.monotonic() - killed_at < 60, (
            "the surviving rank did not fail within train.dist_timeout_s"
        )
        time.sleep(0.2)
    wait_all(study, jobs)
    states = {r.name: r for r in study.runs}
    other = next(r for r in study.runs if r.nodes == 1)
    assert states[other.name].state == "COMPLETED", study.summary()
    saved = {r["name"]: r for r in json.loads((tmp_path / "study" / "study.json").read_text())["runs"]}
    assert saved[doomed.name]["state"] == "FAILED"
    error = saved[doomed.name]["error"]
    assert "rank 1" in error and "node2" in error and f"pid {pid}" in error, error


def test_a_crash_after_an_earlier_preemption_fails_instead_of_requeueing(
    two_nodes, shards: Path, tmp_path: Path
) -> None:
    private = tmp_path / "shards"
    shutil.copytree(shards, private)
    lc = _launch_config(two_nodes, private, tmp_path / "study", launcher="sbatch", max_steps=100_000)
    lc.study.scales = [1]
    study, configs = _study(lc)
    render_study(study, lc, configs)
    job_id, run_dir = study.runs[0].job_id, tmp_path / "study" / study.runs[0].run_dir
    _wait_for_step(run_dir, 3, job_id)
    _preempt(two_nodes, job_id, run_dir)  # attempt 1: stops, result.json says "preempted", requeues itself
    deadline = time.monotonic() + 60
    while not any(
        r["State"] == "REQUEUED" for r in two_nodes.sacct(job_id, ("JobID", "State"), extra=("-D",))
    ):
        assert time.monotonic() < deadline, "the preempted attempt did not requeue itself"
        time.sleep(0.3)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "preempted"
    (private / "manifest.json").unlink()  # attempt 2 crashes at start-up; the stale result.json stays
    row = two_nodes.wait_sacct(job_id, states=("FAILED", "COMPLETED"), timeout_s=180)
    assert (row["State"], row["ExitCode"].split(":")[0] != "0") == ("FAILED", True), row
    time.sleep(2)  # a requeue would show as a new pending attempt
    rows = two_nodes.sacct(job_id, ("JobID", "State"), extra=("-D",))
    assert [r["State"] for r in rows] == ["REQUEUED", "FAILED"] and _squeue_state(job_id) == "GONE", rows


PORT_PROBE = """
import json, os, sys, time
from pathlib import Path
from r2d2_hpc.train.dist import destroy_process_group, dist_env_from_environ, init_process_group
env = dist_env_from_environ(backend="gloo")
init_process_group(env, timeout_s=30)  # rank 0 binds its store on the port
out = Path(sys.argv[1])
(out / f"step{os.environ['SLURM_STEP_ID']}.json").write_text(json.dumps({"port": env.master_port}))
deadline = time.monotonic() + 60
while len(list(out.glob("step*.json"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)  # hold the port until the other step holds its own
destroy_process_group()
"""


def test_two_runs_on_one_node_at_once_get_distinct_ports_below_the_ephemeral_range(
    two_nodes, tmp_path: Path
) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PORT_PROBE)
    py = f"env PYTHONPATH={Path(__file__).resolve().parents[2]} {sys.executable} {probe} {tmp_path}"
    script = tmp_path / "two.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH -N1 -n1 -o {tmp_path}/two.out\n"
        f"srun --overlap -n1 {py} & srun --overlap -n1 {py} &\n"
        "wait -n || exit 1; wait -n || exit 1\n"
    )
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30,
                            check=True).stdout.strip()  # fmt: skip
    row = two_nodes.wait_sacct(job_id, timeout_s=180)
    assert row["State"] == "COMPLETED", (tmp_path / "two.out").read_text()[-3000:]
    ports = {s: json.loads((tmp_path / f"step{s}.json").read_text())["port"] for s in (0, 1)}
    assert ports == {s: derived_port(job_id, str(s)) for s in (0, 1)}
    assert ports[0] != ports[1] and all(15000 <= p < 32768 for p in ports.values())


def test_train_started_without_srun_in_a_two_task_job_fails_at_once_naming_srun(
    two_nodes, shards: Path, tmp_path: Path
) -> None:
    script = tmp_path / "nosrun.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --ntasks=2 -o {tmp_path}/nosrun.out -e {tmp_path}/nosrun.err\n"
        f"cd {Path(__file__).resolve().parents[2]}\n"
        f"{sys.executable} -m r2d2_hpc.train data.shards={shards} run_dir={tmp_path}/run train.max_steps=2 "
        "model=unet model.depth=2 model.base_width=4 train.global_batch=4 train.num_workers=0\n"
    )
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30,
                            check=True).stdout.strip()  # fmt: skip
    row = two_nodes.wait_sacct(job_id, timeout_s=120)
    err = (tmp_path / "nosrun.err").read_text()
    assert row["State"] == "FAILED", (row, err[-2000:])
    assert int(row["ElapsedRaw"]) < 60  # it used to wait train.dist_timeout_s (300 s) for rank 1
    assert "srun python -m r2d2_hpc.train" in err and "rank 0 of 2" in err, err[-2000:]
