"""Diverged and failed runs: listed with their reason, left out of speedup, efficiency and the fitted model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from analysis_logs import write_run

from r2d2_hpc.analysis import analyse

REASON = (
    "training diverged at step 9: the loss or gradient norm was NaN or infinite for 3 consecutive step(s) from "
    "step 7 at lr 8.1e+05"
)


def test_diverged_and_failed_runs_are_listed_and_do_not_count(tmp_path: Path) -> None:
    study = tmp_path / "study"
    write_run(study / "runs", "w1", world_size=1, step_s=0.4)
    write_run(study / "runs", "w2", world_size=2, step_s=0.25)
    write_run(study / "runs", "w4", world_size=4, step_s=0.2)
    # Both would distort every figure if they counted: their steps are far faster than the good runs'.
    diverged = write_run(study / "runs", "w2-diverged", world_size=2, step_s=0.01, status="diverged")
    result = json.loads((diverged / "result.json").read_text())
    (diverged / "result.json").write_text(json.dumps(result | {"reason": REASON, "error": "x: " + REASON}))
    write_run(study / "runs", "w4-failed", world_size=4, step_s=0.01, status=None)
    entries = [
        {"run_dir": f"runs/{name}", "model": "unet", "state": state, **extra}
        for name, state, extra in (
            ("w1", "COMPLETED", {}),
            ("w2", "COMPLETED", {}),
            ("w4", "COMPLETED", {}),
            ("w2-diverged", "DIVERGED", {"error": "x: " + REASON}),
            (
                "w4-failed",
                "FAILED",
                {"error": "DiskError: /scratch/run: writing the checkpoint of step 6 failed"},
            ),
        )
    ]
    (study / "study.json").write_text(json.dumps({"runs": entries}))

    report = analyse([study], write=False, plots=False, workers=1)
    runs = report.runs.set_index("run_id")
    assert runs.loc["w2-diverged", "status"] == "diverged" and runs.loc["w2-diverged", "why"] == REASON
    assert runs.loc["w4-failed", "status"] == "failed"
    assert "writing the checkpoint of step 6 failed" in runs.loc["w4-failed", "why"]
    assert not runs.loc["w2-diverged", "timing_ok"] and not runs.loc["w4-failed", "timing_ok"]

    scaling = report.scaling.set_index("world_size")
    assert list(scaling["repeats"]) == [1, 1, 1]
    assert scaling.loc[2, "throughput"] == pytest.approx(16 / 0.25)
    assert scaling.loc[2, "speedup"] == pytest.approx(0.4 / 0.25)
    assert scaling.loc[4, "speedup"] == pytest.approx(0.4 / 0.2)
    md = report.markdown()
    assert f"w2-diverged (diverged): {REASON}" in md
    assert "w4-failed (failed): state FAILED after 10 steps: DiskError: /scratch/run" in md

    # The fitted step-time model is the one of the good runs alone.
    clean = tmp_path / "clean"
    for name in ("w1", "w2", "w4"):
        write_run(clean, name, world_size=int(name[1]), step_s={"w1": 0.4, "w2": 0.25, "w4": 0.2}[name])
    alone = analyse([clean], write=False, plots=False, workers=1)
    assert not report.fits.empty
    pd.testing.assert_frame_equal(report.fits.reset_index(drop=True), alone.fits.reset_index(drop=True))
