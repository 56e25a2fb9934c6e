"""Known step times in, exact throughput, speedup, efficiency, Karp-Flatt, fitted model and costs out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from analysis_logs import write_run

from r2d2_hpc.analysis import analyse, bootstrap_ratio, fit_step_time_model, karp_flatt
from r2d2_hpc.errors import ConfigError

STRONG_T = {1: 0.8, 2: 0.44, 4: 0.26, 8: 0.18}  # seconds per step at a global batch of 16


def _analyse(root: Path, **options):
    return analyse([root], write=False, plots=False, workers=1, **options)


def _row(table, world_size: int, series: str | None = None):
    rows = table[table["world_size"] == world_size]
    if series is not None:
        rows = rows[rows["series"] == series]
    assert len(rows) == 1
    return rows.iloc[0]


def test_strong_scaling_exact(tmp_path: Path) -> None:
    slow_first = lambda t: lambda s: 10.0 if s <= 2 else t  # noqa: E731 - two slow warm-up steps
    for n, t in STRONG_T.items():
        write_run(
            tmp_path,
            f"u{n}",
            world_size=n,
            global_batch=16,
            step_s=slow_first(t),
            num_steps=12,
            warmup_steps=2,
            data_wait_s=0.02,
            train_samples=160,
        )
    report = _analyse(tmp_path)
    runs = report.runs.set_index("world_size")
    for n, t in STRONG_T.items():
        assert runs.loc[n, "throughput"] == pytest.approx(16 / t, rel=1e-12)
        assert runs.loc[n, "throughput_per_rank"] == pytest.approx(16 / t / n, rel=1e-12)
        assert runs.loc[n, "data_wait_share"] == pytest.approx(0.02 / t, rel=1e-12)
        assert runs.loc[n, "measured_steps"] == 10 and runs.loc[n, "warmup_steps"] == 2
        assert runs.loc[n, "step_s_median"] == pytest.approx(t) and runs.loc[
            n, "step_s_p90"
        ] == pytest.approx(t)
        assert runs.loc[n, "epoch_time_s"] == pytest.approx((160 // n) // (16 // n) * t)  # 10 steps per epoch
    for n, t in STRONG_T.items():
        row = _row(report.scaling, n)
        speedup = STRONG_T[1] / t
        assert row["speedup"] == pytest.approx(speedup, rel=1e-12)
        assert row["efficiency"] == pytest.approx(speedup / n, rel=1e-12)
        assert row["scaling"] == "strong" and row["baseline_world_size"] == 1 and row["repeats"] == 1
        if n > 1:
            assert row["karp_flatt"] == pytest.approx((1 / speedup - 1 / n) / (1 - 1 / n), rel=1e-12)
        else:
            assert np.isnan(row["karp_flatt"])


def test_weak_scaling_uses_the_per_rank_batch(tmp_path: Path) -> None:
    weak_t = {1: 0.2, 2: 0.21, 4: 0.25}
    for n, t in weak_t.items():
        write_run(tmp_path, f"w{n}", world_size=n, scaling="weak", batch_per_rank=4, step_s=t)
    report = _analyse(tmp_path)
    assert set(report.scaling["series"]) == {"unet weak b=4/rank"}
    for n, t in weak_t.items():
        row = _row(report.scaling, n)
        assert row["throughput"] == pytest.approx(4 * n / t, rel=1e-12)
        assert row["throughput_per_rank"] == pytest.approx(4 / t, rel=1e-12)
        assert row["speedup"] == pytest.approx(n * 0.2 / t, rel=1e-12)
        assert row["efficiency"] == pytest.approx(0.2 / t, rel=1e-12)


def test_repeats_give_median_min_max_and_interval(tmp_path: Path) -> None:
    for i, t in enumerate((0.8, 1.0, 1.2)):
        write_run(tmp_path, f"a{i}", world_size=1, step_s=t)
    for i, t in enumerate((0.5, 0.4)):
        write_run(tmp_path, f"b{i}", world_size=2, step_s=t)
    report = _analyse(tmp_path, bootstrap_samples=500)
    base, two = _row(report.scaling, 1), _row(report.scaling, 2)
    assert base["repeats"] == 3 and base["throughput"] == pytest.approx(16.0)
    assert (base["throughput_min"], base["throughput_max"]) == pytest.approx((16 / 1.2, 20.0))
    assert two["speedup"] == pytest.approx(36 / 16) and two["efficiency"] == pytest.approx(36 / 32)
    assert (two["speedup_min"], two["speedup_max"]) == pytest.approx((2.0, 2.5))
    assert 32 / 20 <= two["speedup_ci_low"] <= two["speedup"] <= two["speedup_ci_high"] <= 40 / (16 / 1.2)


def test_bootstrap_and_karp_flatt_edge_cases() -> None:
    rng = np.random.default_rng(0)
    assert np.isnan(bootstrap_ratio(np.array([1.0]), np.array([1.0, 2.0]), 100, rng)[0])
    lo, hi = bootstrap_ratio(np.array([4.0, 4.0]), np.array([2.0, 2.0]), 100, rng)
    assert lo == hi == 2.0
    assert karp_flatt(4.0, 4.0) == 0.0 and karp_flatt(1.0, 4.0) == pytest.approx(1.0)
    assert np.isnan(karp_flatt(1.0, 1.0))


def test_baseline_modes(tmp_path: Path) -> None:
    for n, nodes, t in ((2, 1, 0.5), (4, 1, 0.3), (8, 2, 0.2)):
        write_run(tmp_path, f"r{n}", world_size=n, nodes=nodes, step_s=t)
    single = _analyse(tmp_path, baseline="single-node").scaling
    assert set(single["baseline_world_size"]) == {4}
    assert _row(single, 8)["speedup"] == pytest.approx(0.3 / 0.2) and _row(single, 8)[
        "efficiency"
    ] == pytest.approx(0.75)
    fixed = _analyse(tmp_path, baseline="2").scaling
    assert _row(fixed, 8)["efficiency"] == pytest.approx(0.5 / 0.2 / 4)
    fallback = _analyse(tmp_path, baseline="16")
    assert (
        set(fallback.scaling["baseline_world_size"]) == {2} and "no run at world size 16" in fallback.notes[0]
    )
    with pytest.raises(ConfigError, match="baseline='biggest'"):
        _analyse(tmp_path, baseline="biggest")


C_S, INV_BW, LATENCY_S, GRAD_BYTES = 0.05, 1e-9, 1e-4, 4_000_000


def _model_step_s(n: int, b: float) -> float:
    return C_S * b + 2 * (n - 1) / n * GRAD_BYTES * INV_BW + 2 * (n - 1) * LATENCY_S


def test_fit_from_logs_predicts_a_known_law_and_projects_it(tmp_path: Path) -> None:
    """Strong scaling on one node: the bandwidth term 2(N-1)/N B/bw is a constant plus a 1/N part, so step
    times cannot tell it from a constant; the fit says so, and its predictions are exact either way."""
    for n in (1, 2, 4, 8):
        write_run(tmp_path, f"m{n}", world_size=n, global_batch=64, step_s=_model_step_s(n, 64 / n))
    report = _analyse(tmp_path)
    fit = report.fits.iloc[0]
    assert fit["form"] == "compute/N + constant + latency"
    assert fit["equivalent_forms"] == "compute/N + bandwidth + latency"
    assert fit["constant_ms"] == pytest.approx(2 * GRAD_BYTES * INV_BW * 1e3, rel=1e-6)  # 2 B / bw
    assert fit["latency_us"] == pytest.approx(100.0, rel=1e-6)
    assert fit["compute_s_per_sample"] == pytest.approx(C_S - 2 * GRAD_BYTES * INV_BW / 64, rel=1e-6)
    assert fit["rmse_ms"] < 1e-9 and fit["loo_error"] < 1e-9
    proj = report.curves[report.curves["kind"] == "projection"].set_index("world_size")
    assert list(proj.index) == [16, 32]
    for n in (16, 32):
        assert proj.loc[n, "step_s"] == pytest.approx(_model_step_s(n, 64 / n), rel=1e-6)
        want = (64 / _model_step_s(n, 64 / n)) / (64 / _model_step_s(1, 64)) / n
        assert proj.loc[n, "efficiency"] == pytest.approx(want, rel=1e-6)
        assert proj.loc[n, "step_s_low"] <= proj.loc[n, "step_s"] <= proj.loc[n, "step_s_high"]
    split = report.breakdown.set_index("world_size")  # legacy logs: no measured communication
    assert np.isnan(split.loc[8, "exposed_comm_s"]) and not split.loc[8, "measured_comm"]
    assert split.loc[8, "compute_s"] == pytest.approx(_model_step_s(8, 8) - 0.01, rel=1e-6)


def test_two_scales_fit_no_model_and_say_so(tmp_path: Path) -> None:
    assert fit_step_time_model(np.array([1, 2]), np.array([8.0, 4.0]), np.array([0.4, 0.204]), 1e6) is None
    for n in (1, 2):
        write_run(tmp_path, f"s{n}", world_size=n, global_batch=8, step_s=_model_step_s(n, 8 / n))
    report = _analyse(tmp_path)
    assert report.fits.empty and report.curves.empty
    assert any("2 scales measured; the step-time model needs at least 3" in n for n in report.notes)
    assert "No projection" in report.markdown()


def test_projection_stops_at_the_global_batch(tmp_path: Path) -> None:
    for n in (1, 2, 4):
        write_run(tmp_path, f"s{n}", world_size=n, global_batch=8, step_s=_model_step_s(n, 8 / n))
    report = _analyse(tmp_path)
    assert list(report.curves[report.curves["kind"] == "projection"]["world_size"]) == [8]
    assert any("no projection at 16 ranks (global batch 8 < 16)" in n for n in report.notes)


def test_time_to_target_spans_resumed_segments_and_costs(tmp_path: Path) -> None:
    evals = [(3, 3.5, [1.0, 0.5, 0.5]), (8, 5.0, [1.0, 0.9, 0.7])]
    write_run(tmp_path, "resumed", world_size=2, step_s=1.0, num_steps=10, resume=(6, 4), evals=evals)
    slurm = {
        "job_id": "42",
        "state": "COMPLETED",
        "queue_wait_s": 30.0,
        "elapsed_s": 3600.0,
        "gpus": 4,
        "cpus": 32,
    }
    write_run(tmp_path, "slurm", world_size=4, step_s=0.5, evals=[(10, 9.0, [1.0, 0.8, 0.8])], slurm=slurm)
    report = _analyse(tmp_path, target_dice=0.75)
    runs = report.runs.set_index("run_id")
    # segment 0 ran 6 s (steps 1-6); step 8 is evaluated 5 s into segment 1
    assert runs.loc["resumed", "tta_s"] == pytest.approx(11.0) and runs.loc["resumed", "tta_step"] == 8
    assert runs.loc["resumed", "run_time_s"] == pytest.approx(6.0 + 7.0)  # + steps 5-10 and the end line
    assert runs.loc["resumed", "segments"] == 2 and runs.loc["resumed", "measured_steps"] == 10
    assert runs.loc["resumed", "cost_hours"] == pytest.approx(13.0 * 2 / 3600)
    assert runs.loc["resumed", "cost_unit"] == "rank-hours" and runs.loc[
        "resumed", "final_dice"
    ] == pytest.approx(0.8)
    assert (
        runs.loc["slurm", "cost_hours"] == pytest.approx(4.0)
        and runs.loc["slurm", "cost_unit"] == "GPU-hours"
    )
    assert runs.loc["slurm", "queue_wait_s"] == 30.0 and runs.loc["slurm", "job_id"] == "42"
    assert runs.loc["slurm", "cost_to_target_hours"] == pytest.approx(9.0 * 4 / 3600)
    quality = report.quality.set_index("world_size")
    assert quality.loc[2, "dice_change"] == 0.0 and quality.loc[4, "dice_change"] == pytest.approx(0.0)
    assert quality.loc[4, "reached_target"] == "1/1"


def test_default_target_is_a_share_of_the_baseline_dice(tmp_path: Path) -> None:
    write_run(tmp_path, "one", world_size=1, evals=[(5, 2.0, [1.0, 0.6, 0.6]), (10, 4.0, [1.0, 0.8, 0.8])])
    write_run(tmp_path, "two", world_size=2, evals=[(5, 1.0, [1.0, 0.7, 0.7]), (10, 2.0, [1.0, 0.78, 0.78])])
    report = _analyse(tmp_path)
    assert report.runs["target_dice"].tolist() == pytest.approx([0.95 * 0.8] * 2)
    runs = report.runs.set_index("run_id")
    assert runs.loc["one", "tta_s"] == 4.0 and runs.loc["two", "tta_s"] == 2.0
    quality = report.quality.set_index("world_size")
    assert quality.loc[2, "dice_change"] == pytest.approx(0.78 - 0.8)
