"""Config composition: every experiment file composes, bad values name the valid choices, overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from r2d2_hpc.config import (
    CONF_DIR,
    LaunchConfig,
    PrepareConfig,
    RunConfig,
    TrainConfig,
    register_configs,
    to_dataclass,
)
from r2d2_hpc.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_into_a_checked_launch_config(experiment: str) -> None:
    lc = to_dataclass(LaunchConfig, _compose("launch", [f"experiment={experiment}", "data.root=/data/task"]))
    assert lc.train.max_steps > 0 and lc.study.scales
    lc.train.micro_batch(
        lc.launcher.ranks_per_node() * min(lc.study.scales)
    )  # the batch splits on the first scale


def test_experiments_cover_the_documented_ones() -> None:
    assert {"demo", "paper_unet", "paper_fcn", "msd_brain_tumour_2d", "msd_heart_3d"} <= set(EXPERIMENTS)


def test_demo_is_the_default_study() -> None:
    lc = to_dataclass(LaunchConfig, _compose("launch", []))
    assert lc.launcher.name == "local" and lc.study.models == ["unet", "fcn"] and lc.study.scales == [1, 2]
    assert lc.data.name == "mni_tissue"


def test_label_map_override_from_the_command_line() -> None:
    cfg = to_dataclass(
        PrepareConfig, _compose("prepare", ["data=msd", "data.root=/x", "data.label_map={4:3}"])
    )
    assert cfg.data.label_map == {4: 3}
    assert cfg.out == "data/prepared/msd"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.scaling=diagonal"], "Valid choices are: strong, weak"),
        (["train.lr_scaling=cube"], "none, linear, sqrt"),
        (["data.layout=4d"], "2d, 3d"),
        (["train.global_batch=0"], "train.global_batch=0 must be at least 1"),
    ],
)
def test_bad_values_name_the_valid_choices(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_dataclass(RunConfig, _compose("train", overrides))


def test_unknown_setting_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"Unavailable setting.*bogus.*Valid settings are"):
        to_dataclass(TrainConfig, {"bogus": 1})


def test_strong_scaling_batch_must_split_over_the_ranks() -> None:
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        TrainConfig(global_batch=16).micro_batch(3)
    assert TrainConfig(scaling="weak", batch_per_rank=4).effective_global_batch(8) == 32
