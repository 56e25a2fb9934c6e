"""sbatch scripts rendered from the same config as the submitit launcher, compared with golden files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from r2d2_hpc.config import CONF_DIR, LaunchConfig, RunConfig, register_configs, to_dataclass
from r2d2_hpc.launch.sbatch import render_config, render_script

GOLDEN = Path(__file__).parent / "golden"
REFRESH = "R2D2_REFRESH_GOLDEN"


def _launch_config(overrides: list[str]) -> LaunchConfig:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_dataclass(LaunchConfig, compose("launch", overrides=overrides))


@pytest.mark.parametrize(
    ("name", "overrides", "nodes"),
    [
        (
            "gpu-4x2",
            [
                "experiment=paper_unet",
                "launcher=sbatch",
                "launcher.partition=gpu",
                "launcher.account=proj1",
                "launcher.gpus_per_node=4",
                "launcher.time_min=90",
                "launcher.mem_gb=200",
                "launcher.constraint=h100",
                "launcher.exclusive=true",
                "+launcher.extra_sbatch.mail-type=END",
                "launcher.setup=[module load cuda/12.4,source /opt/r2d2/.venv/bin/activate]",
                "launcher.python=/opt/r2d2/.venv/bin/python",
            ],
            2,
        ),
        ("cpu-1x2", ["launcher=sbatch", "launcher.tasks_per_node=2", "launcher.python=/usr/bin/python3"], 1),
        # conda activate in the setup lines: the activated env's python runs (no absolute python overrides it)
        ("cpu-conda", ["launcher=sbatch", "launcher.setup=[module load anaconda3,conda activate r2d2]"], 1),
    ],
)
def test_rendered_script_matches_golden_file(name: str, overrides: list[str], nodes: int) -> None:
    lc = _launch_config(overrides)
    text = render_script(lc, "unet-n2-r0", nodes, "/scratch/study/runs/unet-n2-r0", "/scratch/study")
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get(REFRESH):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}: run the tests once with {REFRESH}=1 and review the file"
    assert text == golden.read_text(), (
        f"{golden} differs from the rendered script; if the change is intended, refresh it with "
        f"{REFRESH}=1 pytest {__file__} and review the diff"
    )


def test_rendered_config_rebuilds_the_same_run_config(tmp_path: Path) -> None:
    lc = _launch_config(["launcher=sbatch", "train.max_steps=7", "model=fcn"])
    cfg = RunConfig(data=lc.data, model=lc.model, train=lc.train, run_dir=str(tmp_path / "run"))
    (tmp_path / "run.yaml").write_text(render_config(cfg))
    register_configs()
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        again = to_dataclass(RunConfig, compose("run"))
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["train"]["max_steps"] == 7


def test_hydra_multirun_over_models_gives_one_study_each(tmp_path: Path) -> None:
    import subprocess
    import sys

    from r2d2_hpc.config import DataConfig, PrepareConfig
    from r2d2_hpc.data.prepare import run_prepare
    from r2d2_hpc.data.synthetic import write_phantom_dataset

    write_phantom_dataset(
        tmp_path / "raw", num_cases=2, num_channels=1, num_classes=2, shape=(16, 16, 8), seed=0
    )
    run_prepare(
        PrepareConfig(
            data=DataConfig(name="msd", root=str(tmp_path / "raw")),
            out=str(tmp_path / "shards"),
            num_workers=0,
            progress=False,
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "r2d2_hpc.launch",
            "-m",
            "model=unet,fcn",
            "launcher=sbatch",
            "study.scales=[1,2]",
            f"data.shards={tmp_path / 'shards'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    studies = sorted((tmp_path / "runs").iterdir())
    assert [p.name.split("-")[1] for p in studies] == ["fcn", "unet"]
    for study in studies:
        model = study.name.split("-")[1]
        scripts = sorted(p.name for p in (study / "sbatch").glob("*.sbatch"))
        assert scripts == [f"{model}-n1-r0.sbatch", f"{model}-n2-r0.sbatch"]
