"""Timing logs: lines and types, buffering, appending after a cut line, the header, and the step timer."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from r2d2_hpc.errors import R2D2Error
from r2d2_hpc.train import timing
from r2d2_hpc.train.dist import DistEnv
from r2d2_hpc.train.steptimer import StepTimer
from r2d2_hpc.train.timing import TimingLog, read_jsonl, run_header

ENV = DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, 1, "gloo", "cpu", "slurm", "4711")


def write_steps(log: TimingLog, steps: range) -> None:
    for s in steps:
        log.step(s, 0, 0.01 * s, 0.1, 0.11 + 0.01 * s, 16, 1.0 / s, 0.01)


def test_lines_and_types(tmp_path: Path) -> None:
    path = tmp_path / "timing" / "rank1.jsonl"
    with TimingLog(path, {"run_id": "r1", "world_size": 2}, append=False) as log:
        write_steps(log, range(1, 4))
        log.step(4, 1, 0.0, 0.1, 0.1, 16, float("nan"), 0.01)
        log.evaluation(4, 1, [0.99, float("nan"), 0.5], 12.5, num_samples=7)
        log.end(4, status="completed", weights_sha256="ab12")
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN literals
    assert [r["type"] for r in records] == ["header", "step", "step", "step", "step", "eval", "end"]
    header = records[0]
    assert (header["schema"], header["run_id"], header["world_size"], header["resumed_at_step"]) == (
        1,
        "r1",
        2,
        None,
    )
    step2 = records[2]
    assert (step2["step"], step2["epoch"], step2["samples"], step2["loss"], step2["lr"]) == (
        2,
        0,
        16,
        0.5,
        0.01,
    )
    assert step2["data_wait_s"] == pytest.approx(0.02) and step2["step_s"] == pytest.approx(0.13)
    assert abs(step2["time"] - time.time()) < 60
    assert records[4]["loss"] is None  # a NaN loss
    assert records[5] == {
        "type": "eval",
        "step": 4,
        "epoch": 1,
        "dice_per_class": [0.99, None, 0.5],
        "wall_s": 12.5,
        "num_samples": 7,
    }
    assert (records[6]["step"], records[6]["status"], records[6]["weights_sha256"]) == (
        4,
        "completed",
        "ab12",
    )
    assert read_jsonl(path) == records


def test_buffered_until_50_lines_or_1_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rank0.jsonl"
    monkeypatch.setattr(timing, "FLUSH_EVERY_S", 3600.0)
    log = TimingLog(path, {}, append=False)
    write_steps(log, range(1, 50))
    assert len(path.read_text().splitlines()) == 1  # only the header, written at once
    write_steps(log, range(50, 51))
    assert len(path.read_text().splitlines()) == 51
    monkeypatch.setattr(timing, "FLUSH_EVERY_S", 0.0)
    write_steps(log, range(51, 52))
    assert len(path.read_text().splitlines()) == 52
    log.close()
    log.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        write_steps(log, range(52, 53))


def test_append_after_a_cut_last_line(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    with TimingLog(path, {"run_id": "r"}, append=False) as log:
        write_steps(log, range(1, 4))
    with open(path, "a") as fh:
        fh.write('{"type": "step", "step": 4, "epo')  # kill -9 in the middle of a write
    assert [r.get("step") for r in read_jsonl(path)] == [None, 1, 2, 3]  # the cut line is dropped
    with TimingLog(path, {"run_id": "r", "resumed_at_step": 2}, append=True) as log:
        write_steps(log, range(3, 5))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["type"], r.get("step")) for r in records] == [
        ("header", None),
        ("step", 1),
        ("step", 2),
        ("step", 3),
        ("header", None),
        ("step", 3),
        ("step", 4),
    ]
    assert records[4]["resumed_at_step"] == 2


def test_append_to_an_intact_or_missing_file_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    with TimingLog(path, {}, append=True) as log:  # nothing to resume: created
        write_steps(log, range(1, 3))
    with TimingLog(path, {}, append=True) as log:
        write_steps(log, range(3, 4))
    assert [r["type"] for r in read_jsonl(path)] == ["header", "step", "step", "header", "step"]
    with TimingLog(path, {}, append=False) as log:  # a fresh run starts the file over
        pass
    assert [r["type"] for r in read_jsonl(path)] == ["header"]


def test_cut_line_without_any_newline(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    path.write_text('{"type": "hea')
    assert read_jsonl(path) == []
    TimingLog(path, {"run_id": "x"}, append=True).close()
    assert [r["run_id"] for r in read_jsonl(path)] == ["x"]


def test_damaged_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    path.write_text('{"type": "header"}\n{"type": "st\n{"type": "step"}\n')
    with pytest.raises(R2D2Error, match="line 2 is not JSON"):
        read_jsonl(path)


def test_run_header() -> None:
    header = run_header(ENV, "run-7", "unet", 8, 16, "strong", "sqrt", "bf16", {"max_steps": 200})
    assert (header["type"], header["schema"], header["run_id"], header["slurm_job_id"]) == (
        "header",
        1,
        "run-7",
        "4711",
    )
    assert (header["nodes"], header["world_size"], header["rank"], header["local_rank"]) == (1, 2, 1, 1)
    assert (header["model"], header["batch_per_rank"], header["global_batch"]) == ("unet", 8, 16)
    assert (header["scaling"], header["lr_rule"], header["amp"], header["max_steps"]) == (
        "strong",
        "sqrt",
        "bf16",
        200,
    )
    assert header["torch_version"] == torch.__version__ and header["cuda_version"] == torch.version.cuda
    assert header["device_name"] and header["device_name"] != "cpu"
    assert datetime.fromisoformat(header["started_at"]).tzinfo is not None
    json.dumps(header)  # JSON-able as is
    if shutil.which("git"):
        repo = Path(timing.__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=False
        )
        assert header["git_sha"] == (out.stdout.strip() if out.returncode == 0 else None)


def test_step_timer_books_other_data_wait_and_compute() -> None:
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.03)  # zero_grad and the like: other
    timer.data_asked()
    time.sleep(0.05)
    timer.data_ready()
    time.sleep(0.1)
    timer.compute_done()
    [t] = timer.lap(1, 0, torch.tensor(0.25), 0.01)
    assert 0.045 <= t.data_wait_s < 0.5 and 0.095 <= t.compute_s < 0.6 and 0.028 <= t.other_s < 0.4
    assert t.booked_s() == pytest.approx(t.step_s, rel=1e-9) and t.exposed_comm_s == t.comm_s == 0
    assert (t.step, t.epoch, t.loss, t.lr) == (1, 0, 0.25, 0.01)


def test_step_timer_resolves_every_k_steps_with_one_sync_each() -> None:
    timer = StepTimer(torch.device("cpu"), sync_every_steps=3)
    resolved = []
    for step in range(1, 8):
        timer.start()
        for _ in range(2):  # two micro-batches (gradient accumulation): the parts add up
            timer.data_asked()
            time.sleep(0.002)
            timer.data_ready()
            time.sleep(0.004)
            timer.compute_done()
        got = timer.lap(step, 0, torch.tensor(float(step)), 0.1)
        assert len(got) == (3 if step % 3 == 0 else 0)
        resolved += got
        time.sleep(0.02)  # between steps (stop check, evaluation): booked to no step
    assert timer.num_syncs == 2 and [t.step for t in resolved] == [1, 2, 3, 4, 5, 6]
    resolved += timer.resolve()  # before an evaluation, a checkpoint or the end
    assert timer.num_syncs == 3 and [t.loss for t in resolved] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert timer.resolve() == [] and timer.num_syncs == 3
    for t in resolved:
        assert t.data_wait_s >= 0.0039 and t.compute_s >= 0.0079
        assert t.booked_s() == pytest.approx(t.step_s, rel=1e-9) and t.step_s < 0.02 + 0.1


def test_throughput_skips_the_warmup_steps() -> None:
    meter = timing.Throughput(warmup_steps=2)
    for step in range(1, 6):  # steps 1 and 2 are slow warm-up steps and must not count
        meter.add(step, data_wait_s=0.1 * step, step_s=10.0 if step <= 2 else 0.5, samples=16)
    assert meter.samples == 48 and meter.step_s == pytest.approx(1.5)
    assert meter.samples_per_s() == pytest.approx(32.0)
    assert meter.data_wait_share() == pytest.approx((0.3 + 0.4 + 0.5) / 1.5)
    assert timing.Throughput(warmup_steps=5).samples_per_s() is None


def test_run_result_and_training_header(tmp_path: Path) -> None:
    from r2d2_hpc.config import TrainConfig

    tc = TrainConfig(global_batch=16, grad_accum=2, max_steps=30, timing_warmup_steps=1)
    info = {"name": "unet", "spatial_dims": 2, "num_params": 1000, "flops_per_sample": 5e6, "dataset": "d"}
    header = timing.training_header(ENV, "run-7", tc, info, 16, 0.02, (40, 8), resumed_at_step=10)
    assert (header["micro_batch"], header["batch_per_rank"], header["grad_accum"]) == (4, 8, 2)
    assert (header["resumed_at_step"], header["grad_bytes"], header["train_samples"]) == (10, 4000, 40)
    meter = timing.Throughput(1)
    meter.add(2, 0.0, 0.25, 16)
    result = timing.run_result(
        "completed", "run-7", ENV, tc, info, 30, meter, [0.9, float("nan")], ["bg", "x"], 3.0
    )
    assert result["throughput_samples_per_s"] == pytest.approx(64.0)
    assert result["mean_foreground_dice"] is None and result["global_batch"] == 16 and result["steps"] == 30
    path = timing.write_result(tmp_path, {**result, "dice_per_class": [0.9]})
    assert json.loads(path.read_text())["run_id"] == "run-7" and not list(tmp_path.glob("*.tmp"))


def test_progress_logs_every_n_steps(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from r2d2_hpc.train.progress import Progress

    bar = Progress(total=25, start=0, enabled=True, log_every_steps=10)
    bar.bar = None  # pytest's stderr may be a terminal; the log-line path is the one under test
    with caplog.at_level(logging.INFO, logger="r2d2_hpc.train.loop"):
        for step in range(1, 26):
            bar.update(step, 1.0, 0.1)
    assert [r.getMessage().split("/")[0] for r in caplog.records] == ["step 10", "step 20", "step 25"]
    assert not Progress(25, 0, enabled=True, log_every_steps=0).due(20)
