"""A study: the runs of models x scales x repeats, their jobs, and ``study.json`` that lets anyone re-attach.

``study.json`` (format "r2d2-study", version 1) is rewritten atomically whenever a job changes state; it records
for every run its name, model, nodes, world size, repeat, run directory (relative to the study directory), job id,
state and, for a failed job, the tail of its stderr. The analysis reads it to list failed runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from r2d2_hpc.config import CONF_DIR, LaunchConfig, RunConfig
from r2d2_hpc.errors import ConfigError, LaunchError

STUDY_FILE = "study.json"
STUDY_FORMAT, STUDY_VERSION = "r2d2-study", 1
FINISHED = {
    "COMPLETED",
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


def model_configs(lc: LaunchConfig, explicit_model: bool) -> dict[str, dict[str, Any]]:
    """The model config of every model in the study.

    ``study.models`` lists names whose settings come from ``conf/model/<name>.yaml``; the model chosen by the
    ``model`` group keeps its command-line overrides; ``study.model_overrides`` then applies per model. An explicit ``model=<name>`` on the command line (and Hydra
    multirun ``-m model=unet,fcn``) restricts the study to that model.
    """
    chosen = dict(lc.model)
    names = [chosen["name"]] if explicit_model or not lc.study.models else list(lc.study.models)
    configs = {}
    for name in names:
        if name == chosen["name"]:
            configs[name] = chosen
            continue
        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.is_file():
            valid = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
            raise ConfigError(f"study.models names {name!r}, which has no {path}. Valid models are: {valid}")
        configs[name] = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[assignment]
        configs[name]["spatial_dims"] = chosen.get("spatial_dims", configs[name].get("spatial_dims", 2))
    for name, overrides in lc.study.model_overrides.items():
        if name in configs:
            configs[name] = configs[name] | dict(overrides)
    return configs


def nodes_and_ranks(scale: int, unit: str, per_node: int) -> tuple[int, int]:
    """(nodes, total ranks) of one scale: ``scale`` nodes, or ``scale`` ranks packed ``per_node`` to a node."""
    if unit == "nodes":
        return scale, scale * per_node
    if scale > per_node and scale % per_node:
        raise ConfigError(
            f"study.scales has {scale} ranks, which do not fill nodes of {per_node} ranks "
            f"(launcher.tasks_per_node / gpus_per_node); use multiples of {per_node}"
        )
    return max(1, scale // per_node), scale


def plan(lc: LaunchConfig, models: dict[str, dict[str, Any]]) -> list[StudyRun]:
    """Every run of the study, smallest scale first."""
    per_node = lc.launcher.ranks_per_node()
    unit = "ranks" if lc.launcher.name in ("local", "debug") else lc.study.scale_unit  # one machine: ranks
    tag = "n" if unit == "nodes" else "w"
    runs = []
    for name in models:
        for scale in sorted({int(s) for s in lc.study.scales}):
            nodes, world = nodes_and_ranks(scale, unit, per_node)
            for repeat in range(lc.study.repeats):
                run_name = f"{name}-{tag}{scale}-r{repeat}"
                runs.append(StudyRun(run_name, name, nodes, world, repeat, f"runs/{run_name}"))
    return runs


def run_config(lc: LaunchConfig, model: dict[str, Any], study_dir: Path, run: StudyRun) -> RunConfig:
    """The training config of one run; checks the batch split for its world size up front."""
    cfg = RunConfig(
        data=lc.data, model=model, train=lc.train, run_dir=str(study_dir / run.run_dir), resume="auto"
    )
    cfg.train.micro_batch(run.world_size)  # a global batch that cannot be split fails here, not in a job
    return cfg


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
                f"{directory / STUDY_FILE} already exists: this study was submitted before. "
                f"Fix: re-attach with study.attach={directory}, or choose another study.dir"
            )
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": STUDY_FORMAT,
            "format_version": STUDY_VERSION,
            "launcher": launcher,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
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
                "Fix: point study.attach at the study directory printed at submission"
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

    def save(self) -> None:
        path = self.dir / STUDY_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps(self.meta | {"runs": [asdict(r) for r in self.runs]}, indent=1, default=str)
        )
        os.replace(tmp, path)

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
                run.state, run.error = job_outcome(job)
                del pending[name]
                study.save()
            elif by_name[name].state == "SUBMITTED":
                by_name[name].state = _job_state(job)
        if pending:
            time.sleep(poll_s)


def _sacct_row(job_id: str, fields: str, wait_s: float) -> dict[str, str] | None:
    """The job's sacct row once it shows a finished state (the accounting database lags the controller)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = (
                subprocess.run(
                    ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                )
                .stdout.strip()
                .splitlines()
            )
        except (OSError, subprocess.SubprocessError):
            return None
        values = dict(zip(fields.split(","), out[-1].split("|"), strict=False)) if out else None
        finished = values is not None and values.get("State", "").split(" ")[0] in FINISHED
        if finished or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def slurm_accounting(job_id: str, wait_s: float = 30.0) -> dict[str, Any] | None:
    """Queue wait, elapsed time, nodes and allocated TRES of a Slurm job from sacct; None when sacct fails."""
    fields = "JobID,State,Submit,Start,End,ElapsedRaw,NNodes,NCPUS,AllocTRES"
    values = _sacct_row(job_id, fields, wait_s)
    if not values:
        return None
    tres = dict(kv.split("=", 1) for kv in values.get("AllocTRES", "").split(",") if "=" in kv)

    def stamp(key: str) -> datetime | None:
        try:
            return datetime.fromisoformat(values[key])
        except (KeyError, ValueError):
            return None

    submit, start = stamp("Submit"), stamp("Start")
    return {
        "job_id": values.get("JobID"),
        "state": values.get("State", "").split()[0],
        "queue_wait_s": (start - submit).total_seconds() if submit and start else None,
        "elapsed_s": float(values["ElapsedRaw"]) if values.get("ElapsedRaw", "").isdigit() else None,
        "nodes": int(values["NNodes"]) if values.get("NNodes", "").isdigit() else None,
        "cpus": int(values["NCPUS"]) if values.get("NCPUS", "").isdigit() else None,
        "gpus": int(tres.get("gres/gpu", 0) or 0),
        "alloc_tres": values.get("AllocTRES"),
    }


def store_accounting(study: Study) -> None:
    """Writes ``slurm.json`` beside each Slurm run's logs (the analysis turns it into GPU-hours and queue time)."""
    for run in study.runs:
        if not run.job_id:
            continue
        acct = slurm_accounting(run.job_id)
        if acct is None:
            continue
        run_dir = study.dir / run.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "slurm.json.tmp"
        tmp.write_text(json.dumps(acct, indent=1))
        os.replace(tmp, run_dir / "slurm.json")
