"""``python -m r2d2_hpc.study`` against the real local Slurm cluster: a PENDING job and its reason, status of a
running job, cancel (scancel, CANCELLED in study.json and in sacct), resume from the checkpoint, logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def run_cmd(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=5, val_case="phantom_002"
    )


def _study(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r2d2_hpc.study", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _row(study: Path) -> dict:
    done = _study("status", str(study), "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)["runs"][0]


def _wait_row(study: Path, ok, what: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        row = _row(study)
        if ok(row):
            return row
        assert time.monotonic() < deadline, f"{what}: last status {row}"
        time.sleep(2)


def test_pending_reason_cancel_resume_and_logs_of_a_slurm_study(
    slurm_cluster, shards: Path, job_dir: Path
) -> None:
    # A job holding every node: the study's job waits for resources, and status says so.
    blocker = run_cmd(
        [
            "sbatch",
            "--parsable",
            f"--partition={slurm_cluster.partition}",
            f"--nodes={len(slurm_cluster.nodes)}",
            "--exclusive",
            f"--output={job_dir}/blocker.out",
            "--wrap",
            "sleep 600",
        ]
    ).stdout.strip()
    study = job_dir / "study"
    try:
        launched = subprocess.run(
            [
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
                "study.scales=[1]",
                "study.wait=false",
                "model=unet",
                "model.depth=2",
                "model.base_width=4",
                f"data.shards={shards}",
                f"study.dir={study}",
                "train.max_steps=400",
                "train.checkpoint_every_steps=5",
                "train.global_batch=4",
                "train.num_workers=0",
                "train.eval_every_steps=0",
                "train.threads_per_rank=1",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert launched.returncode == 0, launched.stderr[-3000:]
        pending = _wait_row(study, lambda r: r["state"] == "PENDING" and r["reason"], "a pending job")
        assert pending["reason"] in ("Resources", "Priority", "Nodes_required"), pending
        table = _study("status", str(study))
        assert table.returncode == 0 and f"PENDING ({pending['reason']})" in table.stdout, table.stdout
        first_job = pending["job_id"]
    finally:
        run_cmd(["scancel", blocker], check=False)

    running = _wait_row(study, lambda r: r["state"] == "RUNNING" and (r["step"] or 0) >= 12, "step 12")
    assert running["node_list"] in slurm_cluster.nodes and running["total"] == 400
    assert running["loss"] > 0 and running["samples_per_s"] > 0 and running["eta_s"] > 0

    cancelled = _study("cancel", str(study))
    assert cancelled.returncode == 0 and "unet-n1-r0" in cancelled.stdout, cancelled.stderr
    assert json.loads((study / "study.json").read_text())["runs"][0]["state"] == "CANCELLED"
    assert slurm_cluster.wait_sacct(first_job)["State"].startswith("CANCELLED")
    stopped_at = _row(study)["step"]
    assert 12 <= stopped_at < 400

    resumed = _study("resume", str(study), "--no-wait")
    assert resumed.returncode == 0 and "unet-n1-r0" in resumed.stdout, resumed.stdout + resumed.stderr
    second = _wait_row(study, lambda r: r["state"] == "COMPLETED", "the resumed run", timeout_s=400)
    assert second["job_id"] != first_job and second["step"] == 400
    headers = [
        json.loads(line)
        for line in (study / "runs" / "unet-n1-r0" / "timing" / "rank0.jsonl").read_text().splitlines()
        if '"header"' in line
    ]
    assert headers[-1]["resumed_at_step"] >= 10 and headers[-1]["slurm_job_id"] == second["job_id"]
    record = json.loads((study / "study.json").read_text())["runs"][0]
    assert record["extra"]["previous_jobs"] == [{"job_id": first_job, "state": "CANCELLED"}]

    logs = _study("logs", str(study), "unet-n1-r0")
    assert logs.returncode == 0 and f"{second['job_id']}_0_log" in logs.stdout
    assert "resumed from" in logs.stdout


def test_cancel_and_resume_of_an_sbatch_study(slurm_cluster, shards: Path, job_dir: Path) -> None:
    study = job_dir / "sbatch-study"
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "r2d2_hpc.launch",
            "launcher=sbatch",
            "launcher.submit=true",
            f"launcher.partition={slurm_cluster.partition}",
            "launcher.cpus_per_task=1",
            "launcher.tasks_per_node=1",
            "launcher.time_min=10",
            f"launcher.python={sys.executable}",
            "study.scale_unit=nodes",
            "study.scales=[1]",
            "model=unet",
            "model.depth=2",
            "model.base_width=4",
            f"data.shards={shards}",
            f"study.dir={study}",
            "train.max_steps=300",
            "train.checkpoint_every_steps=5",
            "train.global_batch=4",
            "train.num_workers=0",
            "train.eval_every_steps=0",
            "train.threads_per_rank=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    running = _wait_row(study, lambda r: r["state"] == "RUNNING" and (r["step"] or 0) >= 10, "step 10")
    first_job = running["job_id"]
    cancelled = _study("cancel", str(study))
    assert cancelled.returncode == 0, cancelled.stderr
    assert slurm_cluster.wait_sacct(first_job)["State"].startswith("CANCELLED")
    assert _row(study)["state"] == "CANCELLED"

    resumed = _study("resume", str(study))  # sbatch: resubmits the run's script and returns
    assert resumed.returncode == 0 and "unet-n1-r0" in resumed.stdout, resumed.stdout + resumed.stderr
    done = _wait_row(study, lambda r: r["state"] == "COMPLETED", "the resumed sbatch run", timeout_s=400)
    assert done["job_id"] != first_job and done["step"] == 300
    headers = [
        json.loads(line)
        for line in (study / "runs" / "unet-n1-r0" / "timing" / "rank0.jsonl").read_text().splitlines()
        if '"header"' in line
    ]
    assert headers[-1]["resumed_at_step"] >= 5 and headers[-1]["slurm_job_id"] == done["job_id"]
    assert json.loads((study / "runs" / "unet-n1-r0" / "result.json").read_text())["status"] == "completed"
    logs = _study("logs", str(study), "unet-n1-r0", "--rank", "0")
    assert logs.returncode == 0 and f"unet-n1-r0-{done['job_id']}.err" in logs.stdout
