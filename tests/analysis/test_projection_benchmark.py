"""benchmarks/projection.py's comparison: fitted on 1, 2, 4 ranks of a known law, checked at 8."""

from __future__ import annotations

from pathlib import Path

import pytest
from analysis_logs import write_run

from benchmarks.projection import project


def _law(n: int, latency_s: float = 0.0) -> float:
    return 0.01 * 64 / n + 0.02 + 2 * (n - 1) * latency_s  # compute/N + constant (+ latency)


def test_projection_at_8_matches_a_known_law_and_two_scales_refuse(tmp_path: Path) -> None:
    runs = {
        n: [write_run(tmp_path, f"n{n}", world_size=n, global_batch=64, step_s=_law(n))] for n in (1, 2, 4, 8)
    }
    out = project(runs, [1, 2, 4], 8, 64)
    assert out["form"] == "compute/N + constant"
    assert out["measured"]["step_s_median"] == pytest.approx(_law(8), rel=1e-6)
    assert abs(out["relative_error"]) < 1e-6 and out["inside_interval"]
    short = project(runs, [1, 2], 8, 64)
    assert short["projected"] is None and "needs at least 3" in short["why"]


def test_three_fit_scales_allow_two_terms_so_a_third_shows_as_projection_error(tmp_path: Path) -> None:
    """Each leave-one-out fold keeps two scales: a latency term on top is beyond what 1, 2, 4 can choose."""
    runs = {
        n: [write_run(tmp_path, f"n{n}", world_size=n, global_batch=64, step_s=_law(n, 1e-3))]
        for n in (1, 2, 4, 8)
    }
    out = project(runs, [1, 2, 4], 8, 64)
    assert out["form"].count("+") == 1 and out["relative_error"] != pytest.approx(0.0, abs=1e-3)
    low, high = out["prediction_interval_95"]
    assert low <= out["projected_step_s"] <= high
