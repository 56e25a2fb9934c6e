"""Reading one rank's timing log: the bulk path agrees with json line by line, and damage is handled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from analysis_logs import header, step_line

from r2d2_hpc.analysis import SUPPORTED_SCHEMAS, LogError, read_rank_log
from r2d2_hpc.analysis.jsonl import STEP_KEYS


def _json_steps(path: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if r.get("type") == "step"}  # later lines win


def test_real_writer_round_trip(tmp_path: Path) -> None:
    """Lines written by TimingLog itself (NaN loss -> null, tiny lr -> exponent) read back exactly."""
    from r2d2_hpc.train.timing import SCHEMA, TimingLog

    assert SCHEMA in SUPPORTED_SCHEMAS
    path = tmp_path / "timing" / "rank0.jsonl"
    rng = np.random.default_rng(0)
    with TimingLog(path, {"run_id": "r", "world_size": 1}, append=False) as log:
        for s in range(1, 301):
            loss = float("nan") if s == 7 else float(rng.random())
            log.step(
                s, s // 100, float(rng.random()) * 1e-3, 0.1, 0.1 + float(rng.random()), 8, loss, 3e-9 * s
            )
            if s % 100 == 0:
                log.evaluation(s, s // 100, [0.9, float("nan"), 0.5], 12.5)
        log.end(300, status="completed")
    got = read_rank_log(path)
    assert got.fast_path and not got.truncated
    expected = _json_steps(path)
    assert list(got.steps["step"]) == list(range(1, 301))
    for key in STEP_KEYS:
        want = np.array(
            [math.nan if expected[s][key] is None else expected[s][key] for s in range(1, 301)], float
        )
        np.testing.assert_array_equal(got.steps[key].to_numpy(float), want)
    assert math.isnan(got.steps.loc[6, "loss"]) and got.steps.loc[0, "lr"] == 3e-9
    assert [e["step"] for e in got.evals] == [100, 200, 300] and got.evals[0]["dice_per_class"][1] is None
    assert got.ends[0]["status"] == "completed" and len(got.headers) == 1


def _write(path: Path, lines: list[str], newline_at_end: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))
    return path


def _steps(n: int, start: int = 1, step_s: float = 0.5) -> list[str]:
    return [step_line(s, step_s, 0.1, 8, 1000.0 + s) for s in range(start, start + n)]


def test_cut_last_line_is_dropped_and_reported(tmp_path: Path) -> None:
    lines = [json.dumps(header(0, 1)), *_steps(5)]
    path = _write(tmp_path / "rank0.jsonl", [*lines, lines[-1][:40]], newline_at_end=False)
    got = read_rank_log(path)
    assert got.truncated and list(got.steps["step"]) == [1, 2, 3, 4, 5]
    whole = read_rank_log(_write(tmp_path / "rank1.jsonl", lines, newline_at_end=False))
    assert not whole.truncated and list(whole.steps["step"]) == [1, 2, 3, 4, 5]


def test_damaged_line_in_the_middle_raises_with_its_number(tmp_path: Path) -> None:
    lines = [json.dumps(header(0, 1)), *_steps(3), '{"type": "eval", "step": 3, "dice', *_steps(2, start=4)]
    with pytest.raises(LogError, match="line 5 is not JSON"):
        read_rank_log(_write(tmp_path / "rank0.jsonl", lines))


def test_unknown_schema_is_a_clear_error(tmp_path: Path) -> None:
    lines = [json.dumps({**header(0, 1), "schema": 2}), *_steps(3)]
    with pytest.raises(
        LogError, match=r"schema 2.*expected schema 1.*Fix: analyse these logs with the r2d2_hpc"
    ):
        read_rank_log(_write(tmp_path / "rank0.jsonl", lines))


def test_resume_later_lines_win_and_segments_are_numbered(tmp_path: Path) -> None:
    first = [json.dumps(header(0, 1)), *_steps(6, step_s=1.0)]
    second = [json.dumps(header(0, 1, resumed_at_step=4)), *_steps(4, start=5, step_s=2.0)]
    got = read_rank_log(_write(tmp_path / "rank0.jsonl", first + second))
    assert list(got.steps["step"]) == list(range(1, 9))
    assert list(got.steps["step_s"]) == [1.0] * 4 + [2.0] * 4
    assert list(got.steps["segment"]) == [0] * 4 + [1] * 4
    assert got.num_step_lines == 10


def test_other_formatting_and_extra_fields_take_the_slow_path(tmp_path: Path) -> None:
    compact = [json.dumps(json.loads(line), separators=(",", ":")) for line in _steps(3)]
    extra = [json.dumps({**json.loads(line), "grad_norm": 1.5}) for line in _steps(2, start=4)]
    lines = [json.dumps(header(0, 1)), *compact, *_steps(2, start=6), *extra]
    got = read_rank_log(_write(tmp_path / "rank0.jsonl", lines))
    # steps 1-3 (compact) are re-read by json, 4-5 have an extra field so the bulk path gives up
    assert list(got.steps["step"]) == [1, 2, 3, 4, 5, 6, 7]
    assert got.steps["step_s"].tolist() == [0.5] * 7 and got.steps["data_wait_s"].tolist() == [0.1] * 7
    assert not got.fast_path


def test_empty_and_header_only_logs(tmp_path: Path) -> None:
    assert len(read_rank_log(_write(tmp_path / "a.jsonl", [], newline_at_end=False)).steps) == 0
    only_header = read_rank_log(_write(tmp_path / "b.jsonl", [json.dumps(header(0, 2))]))
    assert len(only_header.steps) == 0 and only_header.headers[0]["world_size"] == 2


def test_a_different_line_in_the_middle_makes_the_bulk_path_give_up(tmp_path: Path) -> None:
    middle = json.dumps({**json.loads(_steps(1, start=3)[0]), "grad_norm": 2.0})
    short = json.loads(_steps(1, start=4)[0])
    del short["loss"]
    lines = [json.dumps(header(0, 1)), *_steps(2), middle, json.dumps(short), *_steps(2, start=5)]
    got = read_rank_log(_write(tmp_path / "rank0.jsonl", lines))
    assert not got.fast_path and list(got.steps["step"]) == [1, 2, 3, 4, 5, 6]
    assert got.steps["step_s"].tolist() == [0.5] * 6 and math.isnan(got.steps.loc[3, "loss"])
    assert got.steps["loss"].drop(index=3).tolist() == [1.0] * 5
