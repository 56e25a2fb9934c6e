"""Polling a 20-job Slurm study: one squeue and at most one sacct call per poll cycle, and no accounting at all.

``squeue`` and ``sacct`` on PATH are counting wrappers: each call is logged (its -j list), then answered in the
commands' own output format (the fields asked with -o) from a schedule of job states per call number, the way a
cluster would move 20 jobs from PENDING through RUNNING to their end. What is tested is our poller and waiter.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest

from r2d2_hpc.launch.follow import follow
from r2d2_hpc.launch.live import LiveTable
from r2d2_hpc.launch.record import Study, StudyRun
from r2d2_hpc.launch.scheduler import Backoff, SlurmQueue
from r2d2_hpc.launch.status import study_status

NUM_JOBS = 20

WRAPPER = r'''#!{python}
"""Counting {name} wrapper: logs the call, answers from schedule.json by call number."""
import json, sys
from pathlib import Path

here = Path(__file__).resolve().parent
args = sys.argv[1:]
with open(here / "calls.jsonl", "a") as fh:
    fh.write(json.dumps({{"cmd": "{name}", "args": args}}) + "\n")
calls = sum(1 for line in open(here / "calls.jsonl") if json.loads(line)["cmd"] == "squeue")
schedule = json.loads((here / "schedule.json").read_text())
if "{name}" == "squeue" and schedule.get("controller_down"):
    print("slurm_load_jobs error: Unable to contact slurm controller (connect failure)", file=sys.stderr)
    sys.exit(1)
if "{name}" == "sacct" and schedule.get("no_accounting"):
    print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
    sys.exit(1)
ids = args[args.index("-j") + 1].split(",")
fmt = args[args.index("-o") + 1]
def state_of(job):
    # the state at the latest squeue call (sacct reads the same moment)
    current = None
    for from_call, state, reason in schedule["jobs"][job]:
        if calls >= from_call:
            current = (state, reason)
    return current
rows = []
for job in ids:
    if job not in schedule["jobs"]:
        continue
    state, reason = state_of(job)
    final = state not in ("PENDING", "RUNNING")
    if "{name}" == "squeue":
        if final:
            continue  # a job that has ended has left the queue
        values = {{"%i": job, "%T": state, "%r": reason or "None", "%N": "" if state == "PENDING" else "node1",
                   "%M": "0:00" if state == "PENDING" else "1:05"}}
        rows.append("|".join(values[f] for f in fmt.split("|")))
    else:
        values = {{"JobID": job, "State": state + (" by 0" if state == "CANCELLED" else ""), "Reason": "None",
                   "NodeList": "node1", "ElapsedRaw": "65", "ExitCode": "0:0" if state == "COMPLETED" else "1:0"}}
        rows.append("|".join(values[f] for f in fmt.split(",")))
print("\n".join(rows))
'''


def _wrappers(bin_dir: Path, schedule: dict) -> None:
    bin_dir.mkdir()
    (bin_dir / "schedule.json").write_text(json.dumps(schedule))
    for name in ("squeue", "sacct"):
        path = bin_dir / name
        path.write_text(WRAPPER.format(python=sys.executable, name=name))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _calls(bin_dir: Path) -> list[dict]:
    path = bin_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _schedule(no_accounting: bool = False) -> dict:
    """Job 1000+i: pending (Priority, then Resources for some), running, then its end, at staggered calls."""
    jobs = {}
    for i in range(NUM_JOBS):
        pend_until = 1 + i // 4  # squeue call numbers from 1
        run_until = pend_until + 2 + i % 3 + (8 if i == NUM_JOBS - 1 else 0)  # the last one runs long
        end = "FAILED" if i % 7 == 3 else "COMPLETED"
        jobs[str(1000 + i)] = [
            [1, "PENDING", "Priority"],
            [max(1, pend_until - 1), "PENDING", "Resources" if i % 2 else "Priority"],
            [pend_until, "RUNNING", None],
            [run_until, end, None],
        ]
    return {"jobs": jobs, "no_accounting": no_accounting}


def _study(tmp_path: Path, schedule: dict) -> Study:
    runs = []
    for i in range(NUM_JOBS):
        name = f"unet-n{1 + i % 4}-r{i // 4}"
        run = StudyRun(name, "unet", 1 + i % 4, 1 + i % 4, i // 4, f"runs/{name}", job_id=str(1000 + i))
        run.state = "SUBMITTED"
        runs.append(run)
        final = schedule["jobs"][run.job_id][-1][1]
        if final == "COMPLETED":  # what a finished training run leaves behind
            (tmp_path / "study" / run.run_dir).mkdir(parents=True)
            (tmp_path / "study" / run.run_dir / "result.json").write_text(json.dumps({"status": "completed"}))
    return Study.create(tmp_path / "study", runs, "sbatch", {})


@pytest.fixture
def wrapped_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_twenty_jobs_cost_one_squeue_and_at_most_one_sacct_per_cycle(
    tmp_path: Path, wrapped_path: Path
) -> None:
    schedule = _schedule()
    _wrappers(wrapped_path, schedule)
    study = _study(tmp_path, schedule)
    waits: list[float] = []
    out = io.StringIO()
    queue = SlurmQueue()
    rows = follow(study, queue, Backoff(first_s=2, max_s=20), LiveTable(out), sleep=waits.append)

    cycles = len(waits) + 1
    calls = _calls(wrapped_path)
    squeues = [c for c in calls if c["cmd"] == "squeue"]
    saccts = [c for c in calls if c["cmd"] == "sacct"]
    assert len(squeues) == cycles == queue.calls["squeue"]
    assert len(saccts) <= cycles and len(saccts) == queue.calls["sacct"]
    assert cycles < 3 * NUM_JOBS  # not one call per job and cycle
    # every squeue call asked about all the jobs still open, in one -j list; the first one about all 20
    asked = [c["args"][c["args"].index("-j") + 1].split(",") for c in squeues]
    assert len(asked[0]) == NUM_JOBS
    assert all(len(a) >= len(b) for a, b in itertools.pairwise(asked))

    expected = {str(1000 + i): ("FAILED" if i % 7 == 3 else "COMPLETED") for i in range(NUM_JOBS)}
    assert {r.job_id: r.state for r in rows} == expected
    on_disk = json.loads((study.dir / "study.json").read_text())["runs"]
    assert {r["job_id"]: r["state"] for r in on_disk} == expected
    text = out.getvalue()
    assert "PENDING (Resources)" in text and "PENDING (Priority)" in text and "RUNNING" in text
    # the interval grows while nothing changes and never exceeds the cap
    assert max(waits) <= 20 and min(waits) == 2
    assert any(b > a for a, b in itertools.pairwise(waits))


def test_without_accounting_sacct_is_asked_once_and_files_decide(
    tmp_path: Path, wrapped_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schedule = _schedule(no_accounting=True)
    _wrappers(wrapped_path, schedule)
    study = _study(tmp_path, schedule)
    waits: list[float] = []
    with caplog.at_level(logging.WARNING, logger="r2d2_hpc.launch"):
        rows = follow(
            study, SlurmQueue(), Backoff(first_s=1, max_s=5), LiveTable(io.StringIO()), waits.append
        )

    calls = _calls(wrapped_path)
    assert sum(c["cmd"] == "sacct" for c in calls) == 1
    assert sum(c["cmd"] == "squeue" for c in calls) == len(waits) + 1
    notices = [r for r in caplog.records if "accounting is off" in r.getMessage()]
    assert len(notices) == 1
    # a run that left a completed result.json is COMPLETED; one that left nothing is LOST (no one can say why)
    expected = {str(1000 + i): ("LOST" if i % 7 == 3 else "COMPLETED") for i in range(NUM_JOBS)}
    assert {r.job_id: r.state for r in rows} == expected
    lost = next(r for r in rows if r.state == "LOST")
    assert "no accounting" in (lost.error or "")


def test_a_controller_that_does_not_answer_leaves_every_state_as_recorded(
    tmp_path: Path, wrapped_path: Path
) -> None:
    schedule = _schedule(no_accounting=True) | {"controller_down": True}
    _wrappers(wrapped_path, schedule)
    runs = [
        StudyRun(f"r{i}", "unet", 1, 1, 0, f"runs/r{i}", job_id=str(1000 + i), state="SUBMITTED")
        for i in range(3)
    ]
    study = Study.create(tmp_path / "down", runs, "sbatch", {})
    queue = SlurmQueue()
    rows = study_status(study, queue)
    # neither squeue nor sacct can say anything: no run is declared LOST, and sacct is not asked
    assert [r.state for r in rows] == ["SUBMITTED"] * 3
    assert queue.calls == {"squeue": 1, "sacct": 0} and not queue.answered
