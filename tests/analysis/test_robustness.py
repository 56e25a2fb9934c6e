"""Failed, killed, empty, damaged and missing runs are reported and skipped where they cannot count; studies are
found directly or through study.json; a single-scale study still gets a report; bad input exits with a message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from analysis_logs import header, write_run

from r2d2_hpc.analysis import LogError, analyse, discover_runs
from r2d2_hpc.analysis.__main__ import main


def _analyse(dirs, **options):
    return analyse(dirs, write=False, plots=False, workers=1, **options)


def test_bad_runs_are_reported_and_skipped(tmp_path: Path) -> None:
    study = tmp_path / "study"
    write_run(study, "good1", world_size=1, step_s=0.4)
    write_run(study, "good2", world_size=2, step_s=0.25)
    killed = write_run(study, "killed", world_size=2, step_s=0.2, status=None)
    with open(killed / "timing" / "rank1.jsonl", "a") as fh:
        fh.write('{"type": "step", "step": 11, "epo')  # cut by the kill
    write_run(
        study,
        "failed",
        world_size=2,
        step_s=9.0,
        status=None,
        slurm={"job_id": "7", "state": "FAILED", "elapsed_s": 60.0, "gpus": 2},
    )
    empty = study / "empty" / "timing"
    empty.mkdir(parents=True)
    (empty / "rank0.jsonl").write_text(json.dumps(header(0, 1)) + "\n")
    damaged = write_run(study, "damaged", world_size=1, step_s=0.1)
    text = (damaged / "timing" / "rank0.jsonl").read_text().splitlines()
    text[3] = text[3][:20]
    (damaged / "timing" / "rank0.jsonl").write_text("\n".join(text) + "\n")
    report = _analyse([study])
    runs = report.runs.set_index("run_id")
    assert runs["status"].to_dict() == {
        "damaged": "unreadable",
        "empty": "empty",
        "failed": "failed",
        "good1": "completed",
        "good2": "completed",
        "killed": "killed",
    }
    assert runs.loc["killed", "timing_ok"] and not runs.loc["failed", "timing_ok"]
    assert "last line was cut" in runs.loc["killed", "problems"]
    assert "line 4 is not JSON" in runs.loc["damaged", "why"] and "FAILED" in runs.loc["failed", "why"]
    # killed (0.2 s) and good2 (0.25 s) are the two repeats at 2 ranks; the failed run's 9 s steps do not count
    two = report.scaling[report.scaling["world_size"] == 2].iloc[0]
    assert two["repeats"] == 2 and two["throughput"] == pytest.approx((16 / 0.2 + 16 / 0.25) / 2)
    quality = report.quality.set_index("world_size")
    assert quality.loc[2, "completed"] == 1 and quality.loc[2, "runs"] == 3
    md = report.markdown()
    assert "killed (killed)" not in md and "failed (failed): state FAILED after 10 steps" in md
    assert "empty (empty): no step was logged" in md


def test_study_json_with_cluster_paths_and_missing_runs(tmp_path: Path) -> None:
    study = tmp_path / "copied_study"
    write_run(study / "runs", "a", world_size=1, step_s=0.3)
    write_run(study / "runs", "b", world_size=2, step_s=0.2)
    entries = [
        {"run_dir": "/cluster/scratch/study/runs/a", "model": "unet", "scale": 1, "state": "COMPLETED"},
        {"run_dir": "runs/b", "model": "unet", "scale": 2, "state": "COMPLETED"},
        {"run_dir": "/cluster/scratch/study/runs/c", "model": "unet", "scale": 4, "state": "FAILED"},
    ]
    (study / "study.json").write_text(json.dumps({"runs": entries}))
    refs = discover_runs([study])
    assert [r.path.name if r.path else None for r in refs] == ["a", "b", None]
    report = _analyse([study])
    runs = report.runs.set_index("run_id")
    assert runs.loc["c", "status"] == "missing" and "FAILED" in runs.loc["c", "why"]
    assert list(report.scaling["world_size"]) == [1, 2]
    assert report.scaling.iloc[1]["speedup"] == pytest.approx(1.5)


def test_run_dirs_given_directly_and_nested(tmp_path: Path) -> None:
    a = write_run(tmp_path / "x" / "deep" / "er", "a", world_size=1)
    b = write_run(tmp_path / "y", "b", world_size=2)
    assert [r.path for r in discover_runs([a, tmp_path / "y"])] == [a, b]
    assert [r.path for r in discover_runs([tmp_path])] == [a, b]


def test_single_scale_study_still_gets_a_report(tmp_path: Path) -> None:
    write_run(tmp_path, "r0", world_size=2, step_s=0.5)
    write_run(tmp_path, "r1", world_size=2, step_s=0.25)
    report = analyse([tmp_path], out=tmp_path / "out", workers=1)
    assert set(report.figures) == {"throughput", "breakdown", "loss", "cost"}  # no speedup, no Dice logged
    assert report.scaling.iloc[0]["throughput"] == pytest.approx((32 + 64) / 2)
    assert report.fits.empty and report.curves.empty
    md = (tmp_path / "out" / "report.md").read_text()
    assert "single scale: throughput and time split only, no speedup" in md
    assert (tmp_path / "out" / "scaling.csv").is_file() and (tmp_path / "out" / "report.html").is_file()


def test_cli_exit_status_and_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
    run = write_run(tmp_path, "new", world_size=1)
    log = run / "timing" / "rank0.jsonl"
    log.write_text(log.read_text().replace('"schema": 1', '"schema": 3', 1))
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--no-plots"]) == 2
    assert "schema 3" in capsys.readouterr().err
    shutil.rmtree(run)
    write_run(tmp_path, "ok", world_size=1)
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--no-plots", "--warmup-steps", "3"]) == 0
    assert "1 runs (1 completed)" in capsys.readouterr().out
    assert "3 steps (set by the option)" in (tmp_path / "o" / "report.md").read_text()
    with pytest.raises(LogError, match="no such directory"):
        discover_runs([tmp_path / "nope"])


def test_parallel_loading_gives_the_same_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r2d2_hpc.analysis import load

    for n, t in ((1, 0.4), (2, 0.25), (4, 0.15)):
        write_run(tmp_path, f"p{n}", world_size=n, step_s=t, evals=[(10, 5.0, [1.0, 0.7, 0.8])])
    serial = _analyse([tmp_path])
    monkeypatch.setattr(load, "PARALLEL_MIN_BYTES", 0)
    parallel = analyse([tmp_path], write=False, plots=False, workers=2)
    pd.testing.assert_frame_equal(serial.runs, parallel.runs)
    pd.testing.assert_frame_equal(serial.scaling, parallel.scaling)
