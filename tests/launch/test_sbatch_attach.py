"""An sbatch study rendered in one directory runs from another, and study.attach collects it from its run dirs.

Without a cluster, each script's training command (its srun line without srun) is run from ``/``; the same study
submitted to the real cluster is in tests/slurm/test_sbatch_anywhere.py.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.distributed
TINY = [
    "model=unet",
    "model.base_width=4",
    "model.depth=2",
    "study.scales=[1]",
    "study.repeats=2",
    "train.max_steps=2",
    "train.global_batch=2",
    "train.eval_every_steps=0",
    "train.num_workers=0",
    "train.timing_warmup_steps=0",
]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=2, shape=(16, 16, 8), seed=1, val_case="phantom_002"
    )


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r2d2_hpc.launch", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _training_command(script: Path) -> list[str]:
    """The srun line's command: everything from the python that srun starts."""
    line = next(line for line in script.read_text().splitlines() if line.startswith("srun "))
    words = shlex.split(line)[1:]
    while words[0].startswith("-"):
        words = words[1:]
    return words


def test_rendered_study_runs_from_anywhere_and_attach_names_missing_runs(
    shards: Path, tmp_path: Path
) -> None:
    render_dir = tmp_path / "render"
    (render_dir / "data").mkdir(parents=True)
    (render_dir / "data" / "shards").symlink_to(shards)
    # Relative data.shards and study.dir, as typed in the rendering directory.
    done = _launch(["launcher=sbatch", "data.shards=data/shards", "study.dir=studies/s1", *TINY], render_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    study = render_dir / "studies" / "s1"
    for run in ("unet-n1-r0", "unet-n1-r1"):
        script = (study / "sbatch" / f"{run}.sbatch").read_text()
        assert f"#SBATCH --chdir={study}\n" in script
        config = yaml.safe_load((study / "sbatch" / f"{run}.yaml").read_text())
        assert config["data"]["shards"] == str(render_dir / "data" / "shards")
        assert config["run_dir"] == str(study / "runs" / run)
    first = _training_command(study / "sbatch" / "unet-n1-r0.sbatch")
    assert first[0] == sys.executable  # no setup line activates another environment
    subprocess.run(first, cwd="/", check=True, capture_output=True, timeout=300)

    attach = _launch([f"study.attach={study}"], tmp_path)
    assert attach.returncode == 1
    assert "1 of 2 run(s) have no result and no recorded or queued job: unet-n1-r1" in attach.stderr, (
        attach.stderr[-2000:]
    )
    assert f"sbatch {study}/sbatch/unet-n1-r1.sbatch" in attach.stderr

    subprocess.run(
        _training_command(study / "sbatch" / "unet-n1-r1.sbatch"), cwd="/", check=True, timeout=300
    )
    attach = _launch([f"study.attach={study}"], tmp_path)
    assert attach.returncode == 0, attach.stderr[-3000:]
    record = json.loads((study / "study.json").read_text())
    assert {r["name"]: r["state"] for r in record["runs"]} == {
        "unet-n1-r0": "COMPLETED",
        "unet-n1-r1": "COMPLETED",
    }
    assert "unet-n1-r1" in (study / "report" / "report.md").read_text()
