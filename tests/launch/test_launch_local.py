"""The launcher for real on this machine: a study of two models x two scales as local processes (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "++study.model_overrides.unet.depth=2",
    "++study.model_overrides.unet.base_width=4",
    "++study.model_overrides.fcn.convs_per_stage=[1,1,1]",
    "++study.model_overrides.fcn.base_width=4",
    "++study.model_overrides.fcn.fc_width=8",
    "train.max_steps=2",
    "train.global_batch=4",
    "train.eval_every_steps=0",
    "train.num_workers=0",
    "train.timing_warmup_steps=0",
]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=4, val_case="phantom_002"
    )


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r2d2_hpc.launch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_study_runs_every_model_and_scale_and_reports_a_failed_run(shards: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    # FCN-99s does not exist: its jobs fail inside the job, the U-Net runs must still complete.
    done = _launch(
        [f"data.shards={shards}", f"study.dir={study}", *TINY, "++study.model_overrides.fcn.variant=99s"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((study / "study.json").read_text())
    states = {r["name"]: r["state"] for r in record["runs"]}
    assert states == {
        "unet-w1-r0": "COMPLETED",
        "unet-w2-r0": "COMPLETED",
        "fcn-w1-r0": "FAILED",
        "fcn-w2-r0": "FAILED",
    }
    failed = next(r for r in record["runs"] if r["name"] == "fcn-w1-r0")
    assert "99s" in failed["error"], failed["error"]
    for name, world in (("unet-w1-r0", 1), ("unet-w2-r0", 2)):
        result = json.loads((study / "runs" / name / "result.json").read_text())
        assert result["world_size"] == world and result["steps"] == 2
    assert (study / "report" / "report.html").is_file()
    assert "fcn-w1-r0" in (study / "report" / "report.md").read_text()
    # the headline beside the report's path: the one series with two scales, and the best Dice
    assert "unet strong G=4: 2 ranks on 1 node(s): speedup " in done.stdout, done.stdout[-2000:]
    assert "best mean foreground Dice " in done.stdout


def test_explicit_model_override_restricts_the_study(shards: Path, tmp_path: Path) -> None:
    study = tmp_path / "one"
    done = _launch(
        [
            f"data.shards={shards}",
            f"study.dir={study}",
            "model=unet",
            "study.scales=[1]",
            "study.report=false",
            *TINY,
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((study / "study.json").read_text())["runs"]
    assert [(r["name"], r["state"]) for r in runs] == [("unet-w1-r0", "COMPLETED")]


def test_bad_override_names_the_valid_choices(tmp_path: Path) -> None:
    done = _launch(["launcher=bogus"])
    assert done.returncode != 0
    assert "local" in done.stderr and "slurm" in done.stderr
    done = _launch(["train.scaling=diagonal", f"study.dir={tmp_path / 's'}"])
    assert done.returncode != 0 and "strong, weak" in done.stderr
