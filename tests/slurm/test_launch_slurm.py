"""``python -m r2d2_hpc.launch`` against the real 2-node local Slurm cluster: a study over nodes through submitit
and the same study as sbatch scripts submitted, then collected with ``study.attach`` (issue 10, items 2 and 3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=5, val_case="phantom_002"
    )


def _study_args(cluster, shards: Path, launcher: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "r2d2_hpc.launch",
        f"launcher={launcher}",
        f"launcher.partition={cluster.partition}",
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
        "train.max_steps=6",
        "train.global_batch=4",
        "train.num_workers=0",
        "train.eval_every_steps=3",
        "train.timing_warmup_steps=1",
        "train.threads_per_rank=1",
    ]


def _launch(args: list[str], timeout_s: float = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _check_nodes_study(study: Path) -> None:
    """Both runs completed on 1 and 2 nodes, sacct says so, and the report has a row per node count."""
    runs = {r["name"]: r for r in json.loads((study / "study.json").read_text())["runs"]}
    assert {n: r["state"] for n, r in runs.items()} == {"unet-n1-r0": "COMPLETED", "unet-n2-r0": "COMPLETED"}
    headers = [read_jsonl(study / "runs" / "unet-n2-r0" / "timing" / f"rank{r}.jsonl")[0] for r in (0, 1)]
    assert [(h["world_size"], h["nodes"], h["host"]) for h in headers] == [(2, 2, "node1"), (2, 2, "node2")]
    assert {h["slurm_job_id"] for h in headers} == {runs["unet-n2-r0"]["job_id"]}
    for name, nodes in (("unet-n1-r0", 1), ("unet-n2-r0", 2)):
        acct = json.loads((study / "runs" / name / "slurm.json").read_text())
        assert (acct["state"], acct["nodes"], acct["cpus"], acct["num_attempts"]) == (
            "COMPLETED",
            nodes,
            nodes,
            1,
        )
        assert acct["elapsed_s"] >= 1 and acct["queue_wait_s"] >= 0
    header, *rows = (study / "report" / "scaling.csv").read_text().splitlines()
    nodes_col = header.split(",").index("nodes")
    assert sorted(int(float(row.split(",")[nodes_col])) for row in rows) == [1, 2], rows
    assert (study / "report" / "report.html").is_file()


def test_nodes_study_through_submitit_completes_with_a_row_per_node_count(
    slurm_cluster, shards: Path, tmp_path: Path
) -> None:
    study = tmp_path / "study"
    _launch([*_study_args(slurm_cluster, shards, "slurm"), f"study.dir={study}"])
    _check_nodes_study(study)


def test_sbatch_study_submitted_then_attached_is_collected_like_submitit_s(
    slurm_cluster, shards: Path, tmp_path: Path
) -> None:
    study = tmp_path / "sb"
    _launch([*_study_args(slurm_cluster, shards, "sbatch"), f"study.dir={study}", "launcher.submit=true"])
    scripts = sorted((study / "sbatch").glob("*.sbatch"))
    assert [s.name for s in scripts] == ["unet-n1-r0.sbatch", "unet-n2-r0.sbatch"]
    for script, nodes in zip(scripts, (1, 2), strict=True):
        text = script.read_text()
        assert f"#SBATCH --nodes={nodes}" in text and "#SBATCH --exclusive" in text
        assert "srun --kill-on-bad-exit=1 --cpus-per-task=1 " in text
    _launch([sys.executable, "-m", "r2d2_hpc.launch", f"study.attach={study}"])
    _check_nodes_study(study)


def test_sbatch_test_only_accepts_the_rendered_scripts(slurm_cluster, shards: Path, tmp_path: Path) -> None:
    study = tmp_path / "sb"
    _launch([*_study_args(slurm_cluster, shards, "sbatch"), f"study.dir={study}"], timeout_s=120)
    for script in sorted((study / "sbatch").glob("*.sbatch")):
        check = subprocess.run(
            ["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0 and "to start at" in check.stderr, check.stderr
