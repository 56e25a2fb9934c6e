"""``python -m r2d2_hpc.study`` on real local studies: status while running, cancel, resume, logs, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r2d2_hpc.launch.status import process_alive

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "++study.model_overrides.unet.depth=2",
    "++study.model_overrides.unet.base_width=4",
    "train.global_batch=4",
    "train.eval_every_steps=0",
    "train.num_workers=0",
    "train.timing_warmup_steps=0",
]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=4, val_case="phantom_002"
    )


def _study(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r2d2_hpc.study", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )


def _status_json(study: Path) -> dict:
    done = _study("status", str(study), "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(900)  # two runs, a cancel and a resume on a shared 2-core machine
def test_status_cancel_resume_logs_report_of_a_local_study(shards: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "r2d2_hpc.launch",
            f"data.shards={shards}",
            f"study.dir={study}",
            *TINY,
            "model=unet",
            "study.scales=[1,2]",
            "study.report=false",  # the report verb makes it below
            "train.max_steps=200",
            "train.checkpoint_every_steps=10",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "the first run never reached step 25"
            assert launcher.poll() is None, launcher.stdout.read() if launcher.stdout else ""
            if (study / "study.json").is_file():
                status = _status_json(study)
                first = status["runs"][0]
                if first["state"] == "RUNNING" and (first["step"] or 0) >= 25:
                    break
            time.sleep(1)
        # the running run: its progress from the timing log; the next one waits for it
        assert first["name"] == "unet-w1-r0" and first["total"] == 200 and first["loss"] > 0
        assert first["samples_per_s"] > 0 and first["eta_s"] > 0 and first["node_list"]
        second = status["runs"][1]
        assert second["state"] == "PENDING" and second["world_size"] == 2 and second["total"] == 200
        table = _study("status", str(study))
        assert table.returncode == 0 and "RUNNING" in table.stdout and "/200" in table.stdout
        assert "2 runs: 1 PENDING, 1 RUNNING" in table.stdout

        controller = first["job_id"]
        cancelled = _study("cancel", str(study))
        assert cancelled.returncode == 0, cancelled.stderr
        assert "unet-w1-r0" in cancelled.stdout and "unet-w2-r0" in cancelled.stdout
        out, _ = launcher.communicate(timeout=120)  # the launcher starts no cancelled run and ends
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(30)
    assert not process_alive(controller, "submitit")
    record = json.loads((study / "study.json").read_text())
    assert [r["state"] for r in record["runs"]] == ["CANCELLED", "CANCELLED"], out[-3000:]
    after = _status_json(study)
    assert after["failed"] == 0 and after["done"] is True
    stopped_at = after["runs"][0]["step"]
    assert 25 <= stopped_at < 200

    resumed = _study("resume", str(study), "--no-report", timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    final = _status_json(study)
    assert [(r["name"], r["state"], r["step"]) for r in final["runs"]] == [
        ("unet-w1-r0", "COMPLETED", 200),
        ("unet-w2-r0", "COMPLETED", 200),
    ]
    record = json.loads((study / "study.json").read_text())
    assert record["runs"][0]["extra"]["previous_jobs"] == [{"job_id": controller, "state": "CANCELLED"}]
    # the resumed run continued from the checkpoint written before the cancel, not from step 0
    headers = [
        json.loads(line)
        for line in (study / "runs" / "unet-w1-r0" / "timing" / "rank0.jsonl").read_text().splitlines()
        if '"header"' in line
    ]
    checkpoint = stopped_at - stopped_at % 10  # the one before, if the cancel came while it was written
    assert len(headers) == 2 and headers[1]["resumed_at_step"] in (checkpoint, checkpoint - 10)
    assert headers[1]["resumed_at_step"] > 0

    logs = _study("logs", str(study), "unet-w2-r0", "--rank", "1")
    assert logs.returncode == 0
    shown = [line for line in logs.stdout.splitlines() if line.startswith("==> ")]
    assert shown and all("_1_log." in line for line in shown), shown
    assert "global_rank=1(2)" in logs.stdout
    report = _study("report", str(study), "--no-plots")
    assert report.returncode == 0, report.stderr
    assert (study / "report" / "report.md").is_file() and "report.html" in report.stdout


def test_status_exit_code_and_error_of_a_failed_run(shards: Path, tmp_path: Path) -> None:
    study = tmp_path / "failed"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "r2d2_hpc.launch",
            f"data.shards={shards}",
            f"study.dir={study}",
            *TINY,
            "model=fcn",
            "++model.variant=99s",
            "study.scales=[1]",
            "study.report=false",
            "train.max_steps=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    status = _study("status", str(study))
    assert status.returncode == 1
    assert "FAILED" in status.stdout and "1 failed" in status.stdout and "99s" in status.stdout
    nothing = _study("resume", str(study), "nope")
    assert nothing.returncode == 2 and "fcn-w1-r0" in nothing.stderr  # the error lists the runs
