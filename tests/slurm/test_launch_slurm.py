"""The launcher against the real local Slurm cluster: training jobs, a study, preemption, failures, sbatch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r2d2_hpc.config import DataConfig, LaunchConfig, LauncherConfig, StudyConfig, TrainConfig
from r2d2_hpc.launch.executors import slurm_executor, submit_slurm
from r2d2_hpc.launch.job import TrainJob
from r2d2_hpc.launch.plan import model_configs, plan, run_config
from r2d2_hpc.launch.record import Study, wait_all
from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
TINY_UNET = {"name": "unet", "spatial_dims": 2, "depth": 2, "base_width": 4}


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=5, val_case="phantom_002"
    )


def _launch_config(slurm_cluster, shards: Path, study_dir: Path, **train: object) -> LaunchConfig:
    tc = TrainConfig(
        **{
            "max_steps": 4,
            "global_batch": 4,
            "num_workers": 0,
            "eval_every_steps": 0,
            "timing_warmup_steps": 0,
            "threads_per_rank": 1,
            **train,
        }
    )  # type: ignore[arg-type]
    return LaunchConfig(
        data=DataConfig(name="msd", root=".", shards=str(shards)),
        model=dict(TINY_UNET),
        train=tc,
        launcher=LauncherConfig(
            name="slurm",
            partition=slurm_cluster.partition,
            cpus_per_task=1,
            time_min=10,
            tasks_per_node=1,
            python=sys.executable,
        ),
        study=StudyConfig(name="t", scales=[2], scale_unit="nodes", dir=str(study_dir), report=False),
    )


def test_study_with_two_scales_is_submitted_collected_and_reported(
    slurm_cluster, shards: Path, job_dir: Path
) -> None:
    study = job_dir / "study"
    cmd = [
        sys.executable,
        "-m",
        "r2d2_hpc.launch",
        "launcher=slurm",
        f"launcher.partition={slurm_cluster.partition}",
        "launcher.cpus_per_task=1",
        "launcher.tasks_per_node=1",
        "launcher.time_min=10",
        f"launcher.python={sys.executable}",
        "study.scale_unit=nodes",
        "study.scales=[1,2]",
        "model=unet",
        "model.depth=2",
        "model.base_width=4",
        f"data.shards={shards}",
        f"study.dir={study}",
        "train.max_steps=6",
        "train.global_batch=4",
        "train.num_workers=0",
        "train.eval_every_steps=3",
        "train.timing_warmup_steps=1",
        "train.threads_per_rank=1",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads((study / "study.json").read_text())["runs"]}
    assert {n: r["state"] for n, r in runs.items()} == {"unet-n1-r0": "COMPLETED", "unet-n2-r0": "COMPLETED"}
    header = read_jsonl(study / "runs" / "unet-n2-r0" / "timing" / "rank1.jsonl")[0]
    assert header["world_size"] == 2 and header["slurm_job_id"] == runs["unet-n2-r0"]["job_id"]
    single = read_jsonl(study / "runs" / "unet-n1-r0" / "timing" / "rank0.jsonl")[0]
    assert (
        single["world_size"] == 1 and not (study / "runs" / "unet-n1-r0" / "timing" / "rank1.jsonl").exists()
    )
    acct = json.loads((study / "runs" / "unet-n2-r0" / "slurm.json").read_text())
    assert acct["state"] == "COMPLETED" and acct["cpus"] == 2 and acct["elapsed_s"] >= 1
    assert acct["queue_wait_s"] is not None and acct["queue_wait_s"] >= 0
    scaling = (study / "report" / "scaling.csv").read_text().splitlines()
    assert len(scaling) == 3, scaling  # header + one row per world size
    assert (study / "report" / "report.html").is_file()


def test_failed_job_is_reported_while_the_rest_completes(slurm_cluster, shards: Path, job_dir: Path) -> None:
    lc = _launch_config(slurm_cluster, shards, job_dir / "study")
    lc.study.scales = [1, 2]
    runs = plan(lc, model_configs(lc, explicit_model=True))
    configs = {r.name: run_config(lc, lc.model, job_dir / "study", r) for r in runs}
    configs["unet-n1-r0"].data = DataConfig(name="msd", root=".", shards=str(job_dir / "no-such-shards"))
    study = Study.create(job_dir / "study", runs, "slurm", {})
    wait_all(study, submit_slurm(study, lc, configs))
    states = {r.name: r for r in study.runs}
    assert states["unet-n2-r0"].state == "COMPLETED"
    bad = states["unet-n1-r0"]
    assert bad.state == "FAILED"
    assert "no-such-shards" in bad.error and "manifest.json" in bad.error, bad.error


def _steps_logged(run_dir: Path) -> int:
    log = run_dir / "timing" / "rank0.jsonl"
    steps = [ln["step"] for ln in read_jsonl(log) if ln.get("type") == "step"] if log.exists() else []
    return max(steps, default=0)


def _wait_for_step(run_dir: Path, step: int, job, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while _steps_logged(run_dir) < step:
        assert time.monotonic() < deadline and not job.done(), f"{run_dir} never reached step {step}"
        time.sleep(0.3)


def test_preempted_job_requeues_and_ends_like_an_uninterrupted_one(
    slurm_cluster, shards: Path, job_dir: Path
) -> None:
    steps = 600
    lc = _launch_config(
        slurm_cluster, shards, job_dir, max_steps=steps, checkpoint_every_steps=50, deterministic=True
    )
    lc.model["dropout_p"] = 0.2  # RNG streams must resume exactly too
    (run,) = plan(lc, model_configs(lc, explicit_model=True))
    straight_cfg = run_config(lc, lc.model, job_dir / "straight", run)
    preempted_cfg = run_config(lc, lc.model, job_dir / "preempted", run)
    executor = slurm_executor(job_dir / "jobs", lc, 2, 1)
    preempted = executor.submit(TrainJob(preempted_cfg, max_requeues=3))
    run_dir = Path(preempted_cfg.run_dir)

    _wait_for_step(run_dir, 120, preempted)
    preempted._interrupt()  # submitit's preemption: SIGTERM, then USR2 to every task
    _wait_for_step(run_dir, _steps_logged(run_dir) + 100, preempted)  # requeued, resumed, going on
    subprocess.run(["scancel", "--signal=USR2", preempted.job_id], check=True)
    results = preempted.results()
    assert all(r["status"] == "completed" and r["steps"] == steps for r in results)

    straight = executor.submit(TrainJob(straight_cfg, max_requeues=0))
    straight.results()
    assert json.loads((run_dir / "requeues.json").read_text())["count"] == 2
    resumed_at = [
        ln["resumed_at_step"]
        for ln in read_jsonl(run_dir / "timing" / "rank0.jsonl")
        if ln.get("type") == "header"
    ]
    # Each preemption stopped every rank at a step boundary and checkpointed there (not at a multiple of 50).
    assert resumed_at[0] is None and len(resumed_at) == 3 and 120 <= resumed_at[1] < resumed_at[2] < steps
    ours = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    theirs = torch.load(Path(straight_cfg.run_dir) / "checkpoints" / "last.pt", weights_only=False)["model"]
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), f"{name} differs after two preemptions"


def test_sbatch_scripts_pass_test_only_and_one_runs(slurm_cluster, shards: Path, job_dir: Path) -> None:
    study = job_dir / "sb"
    base = [
        sys.executable,
        "-m",
        "r2d2_hpc.launch",
        "launcher=sbatch",
        f"launcher.partition={slurm_cluster.partition}",
        "launcher.cpus_per_task=1",
        "launcher.tasks_per_node=1",
        "launcher.time_min=10",
        f"launcher.python={sys.executable}",
        "study.scale_unit=nodes",
        "model=unet",
        "model.depth=2",
        "model.base_width=4",
        f"data.shards={shards}",
        "train.max_steps=3",
        "train.global_batch=4",
        "train.num_workers=0",
        "train.threads_per_rank=1",
    ]
    done = subprocess.run(
        [*base, "study.scales=[1,2]", f"study.dir={study}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scripts = sorted((study / "sbatch").glob("*.sbatch"))
    assert [s.name for s in scripts] == ["unet-n1-r0.sbatch", "unet-n2-r0.sbatch"]
    assert "--nodes=1" in scripts[0].read_text() and "--nodes=2" in scripts[1].read_text()
    for script in scripts:
        check = subprocess.run(
            ["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0 and "to start at" in check.stderr, check.stderr

    ran = job_dir / "sb-run"
    done = subprocess.run(
        [*base, "study.scales=[2]", f"study.dir={ran}", "launcher.submit=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = json.loads((ran / "study.json").read_text())["runs"]
    row = slurm_cluster.wait_sacct(record["job_id"], timeout_s=240)
    assert row["State"] == "COMPLETED", row
    result = json.loads((ran / "runs" / "unet-n2-r0" / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 3 and result["status"] == "completed"
