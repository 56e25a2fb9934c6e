"""How many CPU threads each rank should use: the CPUs this process may really run on, not ``os.cpu_count()``.

``os.cpu_count()`` counts the machine. A process may run on fewer: its affinity mask (``taskset``, Slurm's
``--cpu-bind``) and its cgroup's CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1, set by
containers and by Slurm's ``task/cgroup``). :func:`cpus_available` reads both; :func:`plan_threads` turns that
into threads per rank, honouring (in order) ``train.threads_per_rank``, ``OMP_NUM_THREADS`` and Slurm's
``SLURM_CPUS_PER_TASK``, and says when the ranks of a node ask for more threads than there are CPUs (the
timings of such a run measure contention, not the code).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ThreadPlan:
    """The threads one rank uses, and why."""

    threads: int  # torch.set_num_threads value
    cpus_available: int  # CPUs this process may run on (affinity mask, capped by the cgroup quota)
    cpus_from: str  # where cpus_available came from, e.g. "affinity mask" or "cgroup cpu.max"
    ranks_sharing: int  # ranks assumed to share those CPUs (1 when each task has its own mask)
    source: str  # the setting that chose ``threads``
    warning: str | None  # set when ranks_sharing x threads exceed cpus_available

    def describe(self) -> str:
        """One log line: the choice and its inputs."""
        share = "its own" if self.ranks_sharing == 1 else f"shared by {self.ranks_sharing} local ranks"
        return (
            f"{self.threads} thread(s) per rank (from {self.source}); {self.cpus_available} CPU(s) "
            f"available ({self.cpus_from}), {share}"
        )


def cpus_available(
    affinity: set[int] | None = None,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> tuple[int, str]:
    """CPUs this process may use: the affinity mask, capped by the cgroup CPU quota; and what decided it."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    count, source = (len(affinity), "affinity mask") if affinity else (os.cpu_count() or 1, "os.cpu_count")
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    if quota is not None and quota < count:
        return quota, "cgroup CPU quota"
    return count, source


def cgroup_cpu_quota(proc_cgroup: Path, cgroup_root: Path) -> int | None:
    """The cgroup's CPU quota rounded up to whole CPUs, or None when there is none (or it cannot be read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = [*line.split(":", 2), "", ""][:3]
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2: "0::/path", the limit in <path>/cpu.max as "quota period"
            parts = _read(cgroup_root / rel / "cpu.max").split()
            if len(parts) == 2 and parts[0] != "max":
                return _whole_cpus(parts[0], parts[1])
        elif "cpu" in controllers.split(","):  # cgroup v1: quota and period in two files, quota -1 = none
            base = cgroup_root / controllers
            if not base.is_dir():
                base = cgroup_root / "cpu"
            quota = _read(base / rel / "cpu.cfs_quota_us").strip()
            period = _read(base / rel / "cpu.cfs_period_us").strip()
            if quota and period and not quota.startswith("-"):
                return _whole_cpus(quota, period)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _whole_cpus(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def plan_threads(
    requested: int | None, local_world_size: int, environ: Mapping[str, str], cpus: int, cpus_from: str
) -> ThreadPlan:
    """Threads per rank from ``train.threads_per_rank``, else ``OMP_NUM_THREADS``, else the CPU budget.

    The budget is ``SLURM_CPUS_PER_TASK`` under Slurm (capped by the CPUs available), else the CPUs available
    divided by the local ranks. When a rank may run on no more CPUs than Slurm gave its task, Slurm bound each
    task to its own CPUs, so they are not shared with the other local ranks.
    """
    local = max(1, local_world_size)
    per_task = _positive(environ.get("SLURM_CPUS_PER_TASK"))
    if per_task is not None:
        own_mask = cpus <= per_task
        sharing = 1 if own_mask else local
        budget, budget_from = min(per_task, max(1, cpus // sharing)), "SLURM_CPUS_PER_TASK"
    else:
        sharing = local
        budget, budget_from = max(1, cpus // local), f"{cpus} CPU(s) / {local} local rank(s)"
    omp = _positive(environ.get("OMP_NUM_THREADS"))
    if requested:
        threads, source = int(requested), "train.threads_per_rank"
    elif omp is not None:
        threads, source = omp, "OMP_NUM_THREADS"
    else:
        threads, source = budget, budget_from
    warning = None
    if sharing * threads > cpus:
        warning = (
            f"{sharing} rank(s) x {threads} thread(s) = {sharing * threads} threads on {cpus} CPU(s) "
            f"({cpus_from}): the ranks compete for CPUs and the timings measure that contention. Fix: run "
            "fewer ranks per node, lower train.threads_per_rank (or OMP_NUM_THREADS), or request more CPUs "
            "(srun --cpus-per-task)"
        )
    return ThreadPlan(threads, cpus, cpus_from, sharing, source, warning)


def _positive(text: str | None) -> int | None:
    try:
        value = int(str(text).strip()) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None
