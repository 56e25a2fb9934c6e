"""A study: the runs of models x scales x repeats, their jobs, and ``study.json`` that lets anyone attach.

``study.json`` (format "r2d2-study", version 1) is rewritten atomically whenever a job changes state; it records
for every run its name, model, nodes, world size, repeat, run directory (relative to the study directory), job id,
state and, for a failed job, the tail of its stderr. The analysis reads it to list failed runs. It also records
the host and process id of the launcher (a local study's runs live as long as it does), and ``configs/<run>.json``
beside it holds each run's complete training config, so ``python -m r2d2_hpc.study resume`` can resubmit a run.

``python -m r2d2_hpc.study cancel`` marks runs CANCELLED in ``study.json`` while a launcher may still hold the
study in memory: :meth:`Study.save` keeps such a mark for as long as the run's job is the one that was cancelled.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from r2d2_hpc.atomic import write_json
from r2d2_hpc.errors import LaunchError
from r2d2_hpc.launch.outcome import diverged_outcome

STUDY_FILE = "study.json"
CONFIG_DIR = "configs"

STUDY_FORMAT, STUDY_VERSION = "r2d2-study", 1

FINISHED = {
    "COMPLETED",
    "DIVERGED",  # ours, not Slurm's: the job failed because training diverged (its result.json says why)
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "INTERRUPTED",
    "LOST",
}


@dataclass
class StudyRun:
    """One run of the study and its job."""

    name: str
    model: str
    nodes: int
    world_size: int  # ranks: nodes x tasks per node
    repeat: int
    run_dir: str  # relative to the study directory
    job_id: str | None = None
    state: str = "PLANNED"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Study:
    """The study directory and its ``study.json``."""

    def __init__(self, directory: Path, runs: list[StudyRun], meta: dict[str, Any]) -> None:
        self.dir = directory
        self.runs = runs
        self.meta = meta

    @classmethod
    def create(cls, directory: Path, runs: list[StudyRun], launcher: str, config: dict[str, Any]) -> Study:
        if (directory / STUDY_FILE).exists():
            raise LaunchError(
                f"{directory / STUDY_FILE} already exists: this study was launched before. Fix: "
                f"study.attach={directory} continues it (runs what did not complete, or waits for its jobs) "
                "and writes the report; or choose another study.dir for a new study"
            )
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": STUDY_FORMAT,
            "format_version": STUDY_VERSION,
            "launcher": launcher,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "launcher_pid": os.getpid(),
            "config": config,
        }
        study = cls(directory, runs, meta)
        study.save()
        return study

    @classmethod
    def load(cls, directory: Path) -> Study:
        path = directory / STUDY_FILE
        if not path.is_file():
            raise LaunchError(
                f"{path} does not exist; expected the study.json of a submitted study. "
                "Fix: point study.attach at the study directory printed when it was launched"
            )
        data = json.loads(path.read_text())
        if data.get("format") != STUDY_FORMAT or data.get("format_version") != STUDY_VERSION:
            raise LaunchError(
                f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}; "
                f"expected {STUDY_FORMAT!r} version {STUDY_VERSION}. Fix: use the r2d2_hpc version "
                "that wrote it"
            )
        runs = [StudyRun(**r) for r in data.pop("runs")]
        return cls(directory, runs, data)

    def save(self, keep_cancelled: bool = True) -> None:
        """Writes study.json atomically, keeping CANCELLED marks another process wrote (see the module doc)."""
        if keep_cancelled:
            self.keep_cancelled()
        content = self.meta | {"runs": [asdict(r) for r in self.runs]}
        fix = "re-attach with study.attach=<this folder> (or launch again: finished runs are kept)"
        write_json(
            self.dir / STUDY_FILE, content, "the study record (study.json)", fix, indent=1, default=str
        )

    def keep_cancelled(self) -> None:
        """Takes over the CANCELLED marks on disk for runs whose job has not changed since."""
        try:
            on_disk = {r["name"]: r for r in json.loads((self.dir / STUDY_FILE).read_text())["runs"]}
        except (OSError, ValueError, KeyError):
            return
        for run in self.runs:
            disk = on_disk.get(run.name)
            if disk and disk.get("state") == "CANCELLED" and disk.get("job_id") == run.job_id:
                run.state = "CANCELLED"
                run.error = disk.get("error")

    def run(self, name: str) -> StudyRun:
        """The run called ``name``; the error lists the study's runs."""
        for run in self.runs:
            if run.name == name:
                return run
        raise LaunchError(
            f"{self.dir / STUDY_FILE} has no run {name!r}; its runs are: {', '.join(r.name for r in self.runs)}"
        )

    def write_run_configs(self, configs: dict[str, Any]) -> None:
        """``configs/<run>.json``: each run's complete training config (a RunConfig), for resubmission."""
        folder = self.dir / CONFIG_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for name, cfg in configs.items():
            body = json.dumps(
                asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else cfg, indent=1, default=str
            )
            tmp = folder / f"{name}.json.tmp"
            tmp.write_text(body)
            os.replace(tmp, folder / f"{name}.json")

    def run_config(self, run: StudyRun) -> Any:
        """The RunConfig of ``run`` from ``configs/<run>.json`` (else the run directory's ``config.json``)."""
        from r2d2_hpc.config import RunConfig, to_dataclass

        for path in (self.dir / CONFIG_DIR / f"{run.name}.json", self.dir / run.run_dir / "config.json"):
            if path.is_file():
                return to_dataclass(RunConfig, json.loads(path.read_text()))
        raise LaunchError(
            f"{self.dir / CONFIG_DIR / (run.name + '.json')} does not exist, nor does {run.run_dir}/config.json; "
            "expected the run's training config written at launch. Fix: launch the study again with the "
            "same settings and study.dir (finished runs are kept, resume=auto continues the others)"
        )

    def summary(self) -> str:
        lines = [
            f"{r.name:<24} {r.state:<10} job {r.job_id or '-':<10} {r.error.splitlines()[-1] if r.error else ''}"
            for r in self.runs
        ]
        return "\n".join(lines)


def job_outcome(job: Any) -> tuple[str, str | None]:
    """Waits for a submitit job; returns (state, error text or None)."""
    try:
        job.results()  # one result per task (rank)
        return "COMPLETED", None
    except Exception as exc:  # submitit raises its own failure types carrying the job's traceback
        state = _job_state(job)
        tail = _stderr_tail(job)
        message = f"{type(exc).__name__}: {str(exc).strip()[-1500:]}"
        # The scheduler may still say RUNNING/PENDING (accounting lag) or FINISHED (local): the job failed.
        failed_state = state if state in FINISHED - {"COMPLETED"} else "FAILED"
        return failed_state, message + (f"\n--- stderr tail ---\n{tail}" if tail else "")


def run_outcome(study: Study, run: StudyRun, job: Any) -> tuple[str, str | None]:
    """:func:`job_outcome`, except that a run whose ``result.json`` says ``diverged`` is DIVERGED, with its reason.

    A diverged run exits non-zero (it is no measurement), but it is not a crash: the report lists it apart.
    """
    state, error = job_outcome(job)
    if state == "COMPLETED":
        return state, error
    return diverged_outcome(study.dir / run.run_dir) or (state, error)


def _job_state(job: Any) -> str:
    try:
        return str(job.state).split()[0]
    except (
        Exception
    ):  # the scheduler may not answer (accounting lag); the error text still says what happened
        return "FAILED"


def _stderr_tail(job: Any, lines: int = 25) -> str:
    try:
        text = job.stderr() or ""
    except Exception:  # no stderr file (the job never started)
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_all(study: Study, jobs: dict[str, Any], poll_s: float = 2.0) -> None:
    """Waits for every job (submitted at once, e.g. on Slurm), updating study.json as they finish."""
    pending = {name: job for name, job in jobs.items()}
    by_name = {r.name: r for r in study.runs}
    while pending:
        for name, job in list(pending.items()):
            if job.done():
                run = by_name[name]
                run.state, run.error = run_outcome(study, run, job)
                del pending[name]
                study.save()
            elif by_name[name].state == "SUBMITTED":
                by_name[name].state = _job_state(job)
        if pending:
            time.sleep(poll_s)
