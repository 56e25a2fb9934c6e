"""sbatch studies on the real cluster: rendered in one directory, submitted from another, collected by attach."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=5, val_case="phantom_002"
    )


def _launch(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r2d2_hpc.launch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _base(slurm_cluster, shards: Path) -> list[str]:
    return [
        "launcher=sbatch",
        f"launcher.partition={slurm_cluster.partition}",
        "launcher.cpus_per_task=1",
        "launcher.tasks_per_node=1",
        "launcher.time_min=10",
        "model=unet",
        "model.depth=2",
        "model.base_width=4",
        f"data.shards={shards}",
        "train.max_steps=3",
        "train.global_batch=2",
        "train.num_workers=0",
        "train.threads_per_rank=1",
        "train.eval_every_steps=0",
        "study.scales=[1]",
    ]


def test_hand_submitted_scripts_run_from_elsewhere_and_attach_collects_them(
    slurm_cluster, shards: Path, job_dir: Path
) -> None:
    render, submit_from, attach_from = job_dir / "render", job_dir / "elsewhere", job_dir / "third"
    for d in (render, submit_from, attach_from):
        d.mkdir()
    done = _launch([*_base(slurm_cluster, shards), "study.repeats=2", "study.dir=study"], render)
    assert done.returncode == 0, done.stderr[-3000:]
    study = render / "study"
    for script in sorted((study / "sbatch").glob("*.sbatch")):
        # --begin: the jobs are still queued when attach looks for them by name
        sub = subprocess.run(
            ["sbatch", "--begin=now+30", str(script)],
            cwd=submit_from,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sub.returncode == 0, sub.stderr
    attach = _launch([f"study.attach={study}"], attach_from)
    assert attach.returncode == 0, attach.stderr[-3000:]
    assert attach.stdout.count("found its job") == 2, attach.stdout
    runs = json.loads((study / "study.json").read_text())["runs"]
    assert {r["state"] for r in runs} == {"COMPLETED"} and all(r["job_id"] for r in runs)
    for run in runs:
        assert json.loads((study / run["run_dir"] / "result.json").read_text())["steps"] == 3
    assert (study / "report" / "report.md").is_file()
    assert not list(submit_from.iterdir())  # --chdir: nothing was written where sbatch was typed


def test_submitted_study_is_collected_by_its_job_ids(slurm_cluster, shards: Path, job_dir: Path) -> None:
    study = job_dir / "submitted"
    done = _launch([*_base(slurm_cluster, shards), f"study.dir={study}", "launcher.submit=true"], job_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"study.attach={study}" in done.stdout
    attach = _launch([f"study.attach={study}"], job_dir)
    assert attach.returncode == 0, attach.stderr[-3000:]
    (run,) = json.loads((study / "study.json").read_text())["runs"]
    assert "study status" in attach.stdout and f" {run['job_id']} " in attach.stdout  # it followed that job
    assert run["state"] == "COMPLETED"
    assert (study / "runs" / run["name"] / "slurm.json").is_file()  # accounting stored
