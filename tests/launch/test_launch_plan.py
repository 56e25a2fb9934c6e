"""What a study gets when no experiment is named, the printed plan, dry runs, and launch never writing data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from r2d2_hpc.config import CONF_DIR, LaunchConfig, RunConfig, register_configs, to_dataclass


def _compose(name: str, overrides: list[str]) -> object:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def _launch_config(overrides: list[str]) -> LaunchConfig:
    return to_dataclass(LaunchConfig, _compose("launch", overrides))


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r2d2_hpc.launch", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=2, shape=(16, 16, 8), seed=1, val_case="phantom_002"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["launcher=sbatch", "data=msd", "data.root=/data/Task01_BrainTumour"],
        ["launcher=slurm", "data=msd", "data.root=/data/Task01_BrainTumour"],
        ["launcher=local"],
        [],
    ],
)
def test_a_study_without_an_experiment_gets_the_train_defaults(overrides: list[str]) -> None:
    defaults = to_dataclass(RunConfig, _compose("train", [])).train  # what python -m r2d2_hpc.train uses
    lc = _launch_config(overrides)
    assert lc.train == defaults
    assert (lc.train.max_steps, lc.train.global_batch, lc.train.threads_per_rank) == (200, 16, None)
    assert lc.study.model_overrides == {} and lc.study.name != "demo"


def test_the_demo_is_opt_in_and_has_its_own_settings() -> None:
    lc = _launch_config(["experiment=demo"])
    assert (lc.train.max_steps, lc.train.global_batch, lc.train.threads_per_rank) == (30, 8, 1)
    assert lc.study.name == "demo" and lc.study.model_overrides["unet"] == {"base_width": 16}
    main_sh = (CONF_DIR.parent / "scripts" / "main.sh").read_text()
    assert "experiment=demo" in main_sh


def test_an_sbatch_study_on_msd_data_renders_the_train_defaults(shards: Path, tmp_path: Path) -> None:
    raw = shards.parent / "raw"
    study = tmp_path / "study"
    args = ["launcher=sbatch", "data=msd", f"data.root={raw}", f"data.shards={shards}", f"study.dir={study}"]
    done = _launch([*args, "study.scales=[1]", "model=unet"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rendered = yaml.safe_load((study / "sbatch" / "unet-n1-r0.yaml").read_text())
    assert rendered["train"]["max_steps"] == 200 and rendered["train"]["global_batch"] == 16
    assert rendered["train"]["threads_per_rank"] is None
    # The plan came first, before the scripts were rendered.
    plan_at, rendered_at = done.stdout.index("plan: 1 run(s)"), done.stdout.index("rendered 1 sbatch script")
    assert plan_at < rendered_at
    assert "200 steps, strong scaling" in done.stdout and "unet-n1-r0" in done.stdout


def test_dry_run_prints_the_plan_and_the_scripts_and_starts_nothing(shards: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    common = [f"data.shards={shards}", f"study.dir={study}", "study.dry_run=true", "train.global_batch=8"]
    done = _launch(["launcher=sbatch", "launcher.tasks_per_node=2", "study.scales=[1,2]", *common], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "plan: 4 run(s) = 2 model(s) (unet, fcn) x 2 scale(s) (1, 2 nodes) x 1 repeat(s)" in out
    # unet at 2 nodes of 2 ranks: 4 ranks, global batch 8 -> 2 per rank
    row = next(line for line in out.splitlines() if line.strip().startswith("unet-n2-r0"))
    assert row.split()[1:5] == ["2", "4", "8", "2"], row
    assert out.count("#!/bin/bash") == 4 and "#SBATCH --nodes=2" in out
    assert f"{study}/sbatch/fcn-n2-r0.sbatch" in out
    assert not study.exists()
    done = _launch(["launcher=local", "experiment=demo", *common], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "plan: 4 run(s)" in done.stdout and "30 steps" in done.stdout and "nothing was started" in done.stdout
    )
    assert not study.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("launcher", ["sbatch", "local"])
def test_launch_never_prepares_data_and_names_the_prepare_command(launcher: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    for shard_dir, found in ((empty, "has no manifest.json"), (missing, "does not exist")):
        done = _launch([f"launcher={launcher}", f"data.shards={shard_dir}", "study.dir=s"], tmp_path)
        assert done.returncode == 1
        err = done.stderr
        assert f"data.shards={shard_dir} {found}: the data is not prepared" in err, err[-2000:]
        assert f"python -m r2d2_hpc.prepare data=mni_tissue out={shard_dir}" in err
    assert list(empty.iterdir()) == [] and not missing.exists() and not (tmp_path / "s").exists()


def test_repeats_train_with_different_seeds_shared_across_scales(tmp_path: Path) -> None:
    from r2d2_hpc.launch.plan import model_configs, plan, run_config

    lc = _launch_config(["study.scales=[1,2]", "study.repeats=3", "train.seed=10"])
    runs = plan(lc, model_configs(lc, explicit_model=True))
    seeds = {(r.world_size, r.repeat): run_config(lc, lc.model, tmp_path, r).train.seed for r in runs}
    assert {seeds[(1, r)] for r in range(3)} == {10, 11, 12}
    assert all(seeds[(1, r)] == seeds[(2, r)] for r in range(3))
    assert lc.train.seed == 10  # the launch config itself is left alone
