"""The state of every run of a study now: ``study.json``, what Slurm says, the runs' files and timing logs.

:func:`study_status` is what ``python -m r2d2_hpc.study status`` prints and what ``launch`` shows while it waits.
It asks the scheduler once for all jobs (:class:`~.scheduler.SlurmQueue`), checks local processes through
``/proc``, and reads each run's progress from its rank-0 timing log. It writes nothing.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from r2d2_hpc.launch.outcome import diverged_outcome, result_json_outcome, submitit_outcome
from r2d2_hpc.launch.progress import RunProgress, predict_progress, run_progress
from r2d2_hpc.launch.record import CONFIG_DIR, FINISHED, Study, StudyRun
from r2d2_hpc.launch.scheduler import JobInfo, SlurmQueue

LOCAL_LAUNCHERS = ("local", "debug")
# States that mean something went wrong (CANCELLED was asked for, PREEMPTED is resumable: neither counts).
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "LOST"}
ACTIVE_STATES = {"PLANNED", "SUBMITTED", "PENDING", "REQUEUED", "RUNNING", "CONFIGURING", "COMPLETING"}


@dataclass
class RunStatus:
    """One row of the status table."""

    name: str
    model: str
    nodes: int
    world_size: int
    repeat: int
    state: str
    reason: str | None
    job_id: str | None
    node_list: str | None
    elapsed_s: float | None
    step: int | None
    total: int | None
    loss: float | None
    samples_per_s: float | None
    eta_s: float | None
    dice: float | None
    error: str | None

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES


def study_status(study: Study, queue: SlurmQueue | None = None) -> list[RunStatus]:
    """Every run's status; Slurm studies ask ``queue`` (one squeue, at most one sacct) about all jobs at once."""
    launcher = study.meta.get("launcher", "local")
    infos: dict[str, JobInfo] = {}
    queried = False
    if launcher not in LOCAL_LAUNCHERS:
        open_ids = [r.job_id for r in study.runs if r.job_id and r.state not in FINISHED]
        if open_ids:
            queue = queue or SlurmQueue()
            infos = queue.poll(open_ids)
            queried = queue.answered  # a failed squeue leaves every state as recorded
    return [_run_status(study, run, launcher, infos, queried) for run in study.runs]


def _run_status(
    study: Study, run: StudyRun, launcher: str, infos: dict[str, JobInfo], queried: bool
) -> RunStatus:
    if run.extra.get("kind") == "predict":  # cases written / total instead of steps
        prog = predict_progress(study.dir / run.run_dir) or RunProgress()
    else:
        prog = run_progress(study.dir / run.run_dir) or RunProgress()
    state, reason, error = run.state, None, run.error
    node_list, elapsed = None, None
    if state not in FINISHED:
        if launcher in LOCAL_LAUNCHERS:
            state, reason, found_error = _local_state(study, run)
        else:
            info = infos.get(run.job_id or "")
            state, reason, found_error = _slurm_state(study, run, launcher, info, queried)
            if info is not None and state not in ("PENDING", "REQUEUED"):  # a waiting job has no time used
                node_list, elapsed = info.nodes, info.elapsed_s
        error = found_error or error
        if state == "FAILED":  # a run that stopped because training diverged says so in its result.json
            state, error = diverged_outcome(study.dir / run.run_dir) or (state, error)
    if node_list is None and state not in ("PENDING", "REQUEUED"):
        node_list = prog.host if run.job_id else None
    if elapsed is None and state not in ("PENDING", "REQUEUED"):
        elapsed = _elapsed_from_log(prog, running=state == "RUNNING")
    return RunStatus(
        name=run.name,
        model=run.model,
        nodes=run.nodes,
        world_size=run.world_size,
        repeat=run.repeat,
        state=state,
        reason=reason,
        job_id=run.job_id,
        node_list=node_list,
        elapsed_s=elapsed,
        step=prog.step if prog.total is not None else None,
        total=prog.total if prog.total is not None else _planned_steps(study, run),
        loss=prog.loss,
        samples_per_s=prog.samples_per_s,
        eta_s=prog.eta_s if state == "RUNNING" else None,
        dice=prog.dice,
        error=error,
    )


def _local_state(study: Study, run: StudyRun) -> tuple[str, str | None, str | None]:
    """A local run: its controller process alive, else what its files say, else LOST."""
    same_host = study.meta.get("host") in (None, socket.gethostname())
    if run.job_id and run.state == "RUNNING":
        if same_host and process_alive(run.job_id, "submitit"):
            return "RUNNING", None, None
        found = submitit_outcome(study.dir / "jobs", run.job_id, run.world_size)
        if found is not None:
            return found[0], None, found[1]
        return "LOST", "its processes ended without a result", None
    launcher_pid = study.meta.get("launcher_pid")
    if launcher_pid and same_host and not process_alive(str(launcher_pid), "r2d2_hpc"):
        return "LOST", "the launcher ended before it started this run", None
    return ("PENDING", "waiting for the runs before it", None) if launcher_pid else (run.state, None, None)


def _slurm_state(
    study: Study, run: StudyRun, launcher: str, info: JobInfo | None, queried: bool
) -> tuple[str, str | None, str | None]:
    if not run.job_id:
        return run.state, None, None
    if info is not None and info.in_queue:
        state = info.state
        if state == "PENDING" and _requeues(study.dir / run.run_dir):
            state = "REQUEUED"
        return state, info.reason if state in ("PENDING", "REQUEUED") else None, None
    found = (
        result_json_outcome(study.dir / run.run_dir)
        if launcher == "sbatch"
        else submitit_outcome(study.dir / "jobs", run.job_id, run.world_size)
    )
    if info is not None and info.state in FINISHED:
        # the scheduler's word on how it ended; the files add the error text (or a clean COMPLETED)
        if info.state == "COMPLETED" and found is not None:
            return found[0], None, found[1]
        return info.state, None, found[1] if found else None
    if found is not None:
        return found[0], None, found[1]
    if info is not None:  # sacct lags: it still says RUNNING for a job that has just left the queue
        return info.state, None, None
    if not queried:
        return run.state, None, None
    return "LOST", "left the queue without a result (no accounting to say why)", None


def _planned_steps(study: Study, run: StudyRun) -> int | None:
    """train.max_steps from the run's recorded config (a run that has not started has no timing log)."""
    import json

    try:
        return int(
            json.loads((study.dir / CONFIG_DIR / f"{run.name}.json").read_text())["train"]["max_steps"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _requeues(run_dir: Path) -> int:
    import json

    try:
        return int(json.loads((run_dir / "requeues.json").read_text())["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def process_alive(pid: str, needle: str) -> bool:
    """Whether process ``pid`` runs here and its command line contains ``needle`` (a reused pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return needle.encode() in cmdline


def _elapsed_from_log(prog: RunProgress, running: bool) -> float | None:
    if not prog.started_at:
        return None
    try:
        start = datetime.fromisoformat(prog.started_at).timestamp()
    except ValueError:
        return None
    end = time.time() if running else prog.last_time
    return max(0.0, end - start) if end else None


# ------------------------------------------------------------------------------------------------ output
def summary_line(rows: list[RunStatus]) -> str:
    """``4 runs: 2 COMPLETED, 1 RUNNING, 1 PENDING; 310/800 steps; 0 failed``."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    steps = sum(r.step or 0 for r in rows)
    total = sum(r.total or 0 for r in rows)
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    failed = sum(r.failed for r in rows)
    progress = f"; {steps}/{total} steps" if total else ""
    return f"{len(rows)} runs: {parts}{progress}; {failed} failed"


COLUMNS = (
    "run",
    "model",
    "scale",
    "rep",
    "state",
    "job",
    "nodes",
    "elapsed",
    "step",
    "loss",
    "samples/s",
    "ETA",
)


def table(rows: list[RunStatus]) -> str:
    """The status table as aligned text, with the summary line under it."""
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    failures = [f"  {r.name}: {r.error.strip().splitlines()[-1][:160]}" for r in rows if r.failed and r.error]
    return "\n".join([*lines, summary_line(rows), *failures])


def _cells(r: RunStatus) -> tuple[str, ...]:
    state = f"{r.state} ({r.reason})" if r.reason else r.state
    step = f"{r.step}/{r.total}" if r.step is not None and r.total else "-"
    return (
        r.name,
        r.model,
        f"{r.nodes}x{r.world_size}",
        str(r.repeat),
        state,
        r.job_id or "-",
        r.node_list or "-",
        duration(r.elapsed_s),
        step,
        f"{r.loss:.4f}" if r.loss is not None else "-",
        f"{r.samples_per_s:.1f}" if r.samples_per_s is not None else "-",
        duration(r.eta_s),
    )


def duration(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = round(seconds)
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def as_json(study: Study, rows: list[RunStatus]) -> dict[str, Any]:
    """The ``--json`` document: the study, one object per run, the summary."""
    return {
        "study": str(study.dir),
        "launcher": study.meta.get("launcher"),
        "runs": [asdict(r) | {"failed": r.failed, "done": r.done} for r in rows],
        "summary": summary_line(rows),
        "failed": sum(r.failed for r in rows),
        "done": all(r.done for r in rows),
    }
