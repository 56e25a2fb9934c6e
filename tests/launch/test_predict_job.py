"""``python -m r2d2_hpc.predict ... launcher=local``: a job of two parts that study status shows like a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(*args: str, timeout_s: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout_s
    )


def test_launched_predict_splits_the_cases_over_two_parts(make_phantom_shards, tmp_path: Path) -> None:
    shards = make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=4, val_case="phantom_002"
    )
    raw = shards.parent / "raw"  # the MSD-style folder the shards were prepared from
    run_dir = tmp_path / "run"
    trained = _run(
        "r2d2_hpc.train",
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        "train.max_steps=2",
        "model.depth=2",
        "model.base_width=4",
        "train.global_batch=4",
        "train.num_workers=0",
        "train.eval_every_steps=0",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "pred"
    done = _run(
        "r2d2_hpc.predict",
        f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
        f"input={raw}",
        "msd_list=training",
        f"out={out}",
        f"labels={raw / 'labelsTr'}",
        "threads=1",
        "launcher=local",
        "launcher.tasks_per_node=2",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "COMPLETED" in done.stdout
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"phantom_00{i}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (out / "parts").glob("part*.json")) == [
        "part0000-of0002.json",
        "part0001-of0002.json",
    ]
    assert (out / "metrics_summary.csv").is_file()  # the last part merged the records

    status = _run("r2d2_hpc.study", "status", str(out), "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)["runs"]
    assert (row["name"], row["state"], row["world_size"], row["step"], row["total"]) == (
        "predict",
        "COMPLETED",
        2,
        3,
        3,
    )
    logs = _run("r2d2_hpc.study", "logs", str(out), "predict", "--rank", "1")
    assert logs.returncode == 0 and "[part 1]" in logs.stdout and "[part 0]" not in logs.stdout
