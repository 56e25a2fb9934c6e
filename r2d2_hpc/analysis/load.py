"""Finds the runs of a study and loads each into a :class:`RunLog` (all ranks merged step by step).

A run is any directory with ``timing/`` or ``result.json``. The directories given may be runs, studies that hold
runs at any depth, or studies whose ``study.json`` lists runs (``{"runs": [{"run_dir": ..., "model": ...,
"scale": ..., "state": ...}]}``); a listed run whose directory is gone is kept as a "missing" run. Paths in
``study.json`` that do not exist (logs copied off the cluster) are looked up by name inside the study.
Runs are loaded in parallel worker processes when there is enough to read.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from r2d2_hpc.analysis.jsonl import EVAL_TYPES, LogError, RankLog, empty_steps, read_rank_log
from r2d2_hpc.errors import problem

_RANK_FILE = re.compile(r"^rank(\d+)\.jsonl$")
STUDY_VERSIONS = (1,)  # of study.json ("format": "r2d2-study"), written by r2d2_hpc.launch.record
PARALLEL_MIN_BYTES = 32 * 2**20  # below this, starting worker processes costs more than it saves


@dataclass
class RunRef:
    """Where a run is (None when study.json lists it but its directory is absent) and its study.json entry."""

    path: Path | None
    entry: dict[str, Any] | None = None


@dataclass
class RunLog:
    """One run: its files, and its steps merged over ranks (one row per step).

    ``steps`` columns: step, epoch, segment (0, then +1 per resume), step_s / data_wait_s / compute_s /
    exposed_comm_s / comm_s / other_s (mean over ranks; the last three NaN in logs that predate them), step_s_max and data_wait_s_max (slowest rank), samples, loss (mean over ranks), lr, time (rank 0),
    num_ranks. ``ranks``: one row per rank log (rank, host, steps, median step time, data-wait share, truncated).
    """

    ref: RunRef
    run_id: str
    headers: list[dict[str, Any]] = field(default_factory=list)
    steps: pd.DataFrame = field(default_factory=empty_steps)
    ranks: pd.DataFrame = field(default_factory=pd.DataFrame)
    evals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    slurm: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    unreadable: str | None = None
    segment_times: dict[int, tuple[float, float]] = field(
        default_factory=dict
    )  # (first step start, last line)
    rank_headers: list[dict[str, Any]] = field(default_factory=list)  # the first header of every rank log

    @property
    def header(self) -> dict[str, Any]:
        """The first header of the lowest rank (who and what ran), or {}."""
        return self.headers[0] if self.headers else {}


def discover_runs(dirs: list[str | Path]) -> list[RunRef]:
    """Every run below ``dirs`` (see the module docstring), each once, in a stable order; runs that study.json
    lists but that are nowhere to be found come last, with no path."""
    found: dict[Path, RunRef] = {}
    missing: list[RunRef] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise LogError(problem(d, "no such directory", "a run or study directory", "check the path"))
        walked = _walk_runs(d)
        by_name: dict[str, list[Path]] = {}
        for path in walked:
            by_name.setdefault(path.name, []).append(path)
        for entry in _study_entries(d):
            path = _entry_path(d, entry, by_name)
            if path is None:
                missing.append(RunRef(None, entry))
            else:
                found.setdefault(path.resolve(), RunRef(path, entry))
        for path in walked:
            found.setdefault(path.resolve(), RunRef(path))
    return sorted(found.values(), key=lambda r: str(r.path)) + missing


def is_run_dir(path: Path) -> bool:
    """A run directory has ``timing/`` or ``result.json``."""
    return (path / "timing").is_dir() or (path / "result.json").is_file()


def _walk_runs(root: Path) -> list[Path]:
    runs = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            runs.append(here)
            dirnames.clear()  # a run's own sub-folders (timing, checkpoints) hold no runs
        else:
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
    return runs


def _study_entries(study: Path) -> list[dict[str, Any]]:
    path = study / "study.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise LogError(
            problem(path, f"not JSON ({exc})", '{"runs": [{"run_dir": ...}, ...]}', "repair it")
        ) from exc
    if (
        isinstance(data, dict)
        and data.get("format") == "r2d2-study"
        and data.get("format_version") not in STUDY_VERSIONS
    ):
        raise LogError(
            problem(
                path,
                f"study.json version {data.get('format_version')!r}",
                f"version {', '.join(map(str, STUDY_VERSIONS))}",
                "analyse it with the r2d2_hpc version that wrote it, or upgrade r2d2_hpc",
            )
        )
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and r.get("run_dir") for r in runs):
        raise LogError(
            problem(path, "no list of runs with run_dir", '{"runs": [{"run_dir": ...}, ...]}', "repair it")
        )
    return runs


def _entry_path(study: Path, entry: dict[str, Any], by_name: dict[str, list[Path]]) -> Path | None:
    """The listed path, else (logs copied elsewhere) the one run of that name found inside the study."""
    listed = Path(entry["run_dir"])
    candidate = listed if listed.is_absolute() else study / listed
    if candidate.is_dir():
        return candidate
    same_name = by_name.get(listed.name, [])
    return same_name[0] if len(same_name) == 1 else None


def load_runs(refs: list[RunRef], workers: int | None = None) -> list[RunLog]:
    """Loads every run, in worker processes when there is enough to read (``workers``: None = CPU count).

    Runs are named by their directory; when two share a name, by their parent and name."""
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    total_bytes = sum(_timing_bytes(r.path) for r in refs if r.path is not None)
    if workers == 1 or len(refs) < 2 or total_bytes < PARALLEL_MIN_BYTES:
        runs = [load_run(r) for r in refs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(refs))) as pool:
            runs = list(pool.map(load_run, refs, chunksize=1))
    names = [r.run_id for r in runs]
    for run in runs:
        if names.count(run.run_id) > 1 and run.ref.path is not None:
            run.run_id = f"{run.ref.path.parent.name}/{run.ref.path.name}"
    return runs


def _timing_bytes(path: Path) -> int:
    timing = path / "timing"
    return sum(f.stat().st_size for f in timing.glob("rank*.jsonl")) if timing.is_dir() else 0


def load_run(ref: RunRef) -> RunLog:
    """Reads a run directory. Damage a report can live with becomes ``problems``; a damaged log line makes
    the run ``unreadable`` (reported, skipped); only an unknown schema version raises."""
    entry = ref.entry or {}
    name = (
        ref.path.name
        if ref.path is not None
        else str(entry.get("name") or Path(str(entry.get("run_dir"))).name)
    )
    run = RunLog(ref, name)
    if ref.path is None:
        return run
    for attr, file in (("result", "result.json"), ("config", "config.json"), ("slurm", "slurm.json")):
        setattr(run, attr, _read_json(ref.path / file, run.problems))
    try:
        logs = _read_rank_logs(ref.path / "timing", run)
    except LogError as exc:
        if "schema" in str(exc):
            raise
        run.unreadable = str(exc)
        return run
    if logs:
        first = logs[min(logs)]
        run.headers = first.headers
        run.rank_headers = [log.headers[0] for log in logs.values() if log.headers]
        run.evals = first.evals
        run.end = first.ends[-1] if first.ends else None
        run.segment_times = first.segment_times
        run.steps = _merge_ranks(logs)
        run.ranks = _rank_table(logs)
    if not run.evals:
        run.evals = _metrics_evals(ref.path / "metrics.jsonl", run.problems)
    _note_missing_ranks(run, logs)
    return run


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        problems.append(f"{path.name} is unreadable ({exc}); ignored")
        return None
    return data if isinstance(data, dict) else None


def _read_rank_logs(timing: Path, run: RunLog) -> dict[int, RankLog]:
    logs: dict[int, RankLog] = {}
    if not timing.is_dir():
        return logs
    for path in timing.iterdir():
        match = _RANK_FILE.match(path.name)
        if match:
            logs[int(match.group(1))] = read_rank_log(path)
    for rank in sorted(logs):
        if logs[rank].truncated:
            run.problems.append(f"rank {rank}: the last line was cut (killed mid-write); dropped")
        if not logs[rank].headers:
            run.problems.append(f"rank {rank}: the log has no header line")
    return dict(sorted(logs.items()))


def _merge_ranks(logs: dict[int, RankLog]) -> pd.DataFrame:
    """One row per step: means over ranks, the slowest rank's step time and data wait, rank 0's clock."""
    present = [log.steps for log in logs.values() if len(log.steps)]
    if not present:
        return empty_steps()
    lead = present[0]
    if all(np.array_equal(t["step"].to_numpy(), lead["step"].to_numpy()) for t in present[1:]):
        return _merge_aligned(present)  # the usual case: every rank logged the same steps
    table = pd.concat([t.assign(rank=i) for i, t in enumerate(present)], ignore_index=True)
    merged = table.groupby("step", sort=True).agg(
        epoch=("epoch", "max"),
        segment=("segment", "max"),
        step_s=("step_s", "mean"),
        step_s_max=("step_s", "max"),
        data_wait_s=("data_wait_s", "mean"),
        data_wait_s_max=("data_wait_s", "max"),
        compute_s=("compute_s", "mean"),
        exposed_comm_s=("exposed_comm_s", "mean"),
        comm_s=("comm_s", "mean"),
        other_s=("other_s", "mean"),
        samples=("samples", "max"),
        loss=("loss", "mean"),
        lr=("lr", "first"),
        num_ranks=("rank", "size"),
    )
    merged["time"] = lead.set_index("step")["time"].reindex(merged.index).to_numpy()
    return merged.reset_index()


def _merge_aligned(tables: list[pd.DataFrame]) -> pd.DataFrame:
    def stack(column: str) -> np.ndarray:
        return np.vstack([t[column].to_numpy(np.float64) for t in tables])

    step_s, wait_s, loss = stack("step_s"), stack("data_wait_s"), stack("loss")
    lead = tables[0]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step whose loss is NaN on every rank stays NaN
        mean_loss = np.nanmean(loss, axis=0)
    return pd.DataFrame(
        {
            "step": lead["step"].to_numpy(),
            "epoch": lead["epoch"].to_numpy(),
            "segment": lead["segment"].to_numpy(),
            "step_s": step_s.mean(axis=0),
            "step_s_max": step_s.max(axis=0),
            "data_wait_s": wait_s.mean(axis=0),
            "data_wait_s_max": wait_s.max(axis=0),
            "compute_s": stack("compute_s").mean(axis=0),
            "exposed_comm_s": stack("exposed_comm_s").mean(axis=0),
            "comm_s": stack("comm_s").mean(axis=0),
            "other_s": stack("other_s").mean(axis=0),
            "samples": lead["samples"].to_numpy(),
            "loss": mean_loss,
            "lr": lead["lr"].to_numpy(),
            "num_ranks": len(tables),
            "time": lead["time"].to_numpy(),
        }
    )


def _rank_table(logs: dict[int, RankLog]) -> pd.DataFrame:
    rows = []
    for rank, log in logs.items():
        steps = log.steps
        total_s = float(steps["step_s"].sum()) if len(steps) else 0.0
        rows.append(
            {
                "rank": rank,
                "host": (log.headers[0].get("host") if log.headers else None),
                "steps": len(steps),
                "step_s_median": float(steps["step_s"].median()) if len(steps) else np.nan,
                "data_wait_share": float(steps["data_wait_s"].sum()) / total_s if total_s > 0 else np.nan,
                "compute_share": float(steps["compute_s"].sum()) / total_s if total_s > 0 else np.nan,
                "truncated": log.truncated,
                "fast_path": log.fast_path,
            }
        )
    return pd.DataFrame(rows)


def _metrics_evals(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Evaluations from rank 0's metrics.jsonl, used when no timing log holds them."""
    if not path.is_file():
        return []
    evals = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rec = json.loads(line)
        except ValueError:
            problems.append(f"metrics.jsonl line {number} is not JSON; ignored")
            continue
        if isinstance(rec, dict) and "dice_per_class" in rec and rec.get("type", "eval") in EVAL_TYPES:
            evals.append({**rec, "segment": 0})
    return evals


def _note_missing_ranks(run: RunLog, logs: dict[int, RankLog]) -> None:
    world_size = run.header.get("world_size") or (run.result or {}).get("world_size")
    if isinstance(world_size, int) and logs and len(logs) < world_size:
        absent = sorted(set(range(world_size)) - set(logs))
        run.problems.append(f"timing logs of ranks {absent} are missing; step times use the other ranks")
