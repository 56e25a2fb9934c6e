"""The convergence check: Dice at an equal number of samples seen, over seeds, with a verdict only when the
95% interval of the change excludes zero and each scale has at least 3 seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
from analysis_logs import write_run

from r2d2_hpc.analysis import analyse


def _weak_series(root: Path, model: str, drop: float, seeds: int = 3) -> None:
    """1 rank x 4 samples for 30 steps, 2 ranks x 4 samples for 10 steps (weak scaling: 80 samples)."""
    for seed in range(seeds):
        noise = 0.002 * (seed - 1)
        # 1 rank: Dice 0.80 after 80 samples (step 20), 0.90 after 120 (step 30, beyond the common budget).
        write_run(
            root,
            f"{model}1_s{seed}",
            model=model,
            scaling="weak",
            batch_per_rank=4,
            num_steps=30,
            evals=[
                (10, 1.0, [1, 0.6, 0.6]),
                (20, 2.0, [1, 0.8 + noise, 0.8 + noise]),
                (30, 3.0, [1, 0.9, 0.9]),
            ],
            seed=seed,
        )
        d = 0.8 - drop + noise
        write_run(
            root,
            f"{model}2_s{seed}",
            world_size=2,
            model=model,
            scaling="weak",
            batch_per_rank=4,
            num_steps=10,
            evals=[(5, 0.5, [1, 0.6, 0.6]), (10, 1.0, [1, d, d])],
            seed=seed,
        )


def _row(report, model: str, ws: int):
    c = report.convergence
    rows = c[(c["series"].str.startswith(model)) & (c["world_size"] == ws)]
    assert len(rows) == 1, c
    return rows.iloc[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("convergence")
    _weak_series(root, "unet", drop=0.0)
    _weak_series(root, "fcn", drop=0.05)
    return analyse([root], out=root / "report")


def test_dice_is_compared_at_equal_samples_seen_not_at_the_end(report) -> None:
    base = _row(report, "unet", 1)
    assert base["samples_seen"] == 80 and base["seeds"] == 3
    # The 1-rank run's final 0.90 (after 120 samples) is not what the 2-rank run is compared with.
    assert base["dice_mean"] == pytest.approx(0.8, abs=1e-9)
    assert base["verdict"] == "baseline"


def test_no_change_detected_when_the_interval_holds_zero(report) -> None:
    same = _row(report, "unet", 2)
    assert same["dice_change"] == pytest.approx(0.0, abs=1e-9)
    assert same["change_ci_low"] < 0 < same["change_ci_high"]
    assert same["verdict"] == "no change detected"


def test_a_real_drop_is_called_a_change(report) -> None:
    lower = _row(report, "fcn", 2)
    assert lower["dice_change"] == pytest.approx(-0.05, abs=1e-9)
    assert lower["change_ci_high"] < 0 and lower["verdict"] == "changed: lower"
    text = (report.out / "report.md").read_text()
    assert "Did scaling change convergence?" in text and "changed: lower" in text
    assert (report.out / "convergence.csv").is_file()


def test_fewer_than_three_seeds_give_no_verdict(tmp_path: Path) -> None:
    _weak_series(tmp_path, "unet", drop=0.05, seeds=2)
    row = _row(analyse([tmp_path], write=False), "unet", 2)
    assert row["dice_change"] == pytest.approx(-0.05, abs=1e-9)
    assert row["verdict"].startswith("too few seeds")
