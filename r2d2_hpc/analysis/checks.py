"""What a reader must know before trusting the numbers: honesty checks, the environment, utilisation, stragglers.

All of it comes from the timing headers and end lines (``train/machine.py`` records CPUs, threads, load, CPU
steal, versions and the device peak) and the per-run table; nothing is estimated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from r2d2_hpc.analysis.load import RunLog

LOAD_PER_CPU = 1.0  # a 1-minute load average above this many runnable threads per CPU means a busy machine
STEAL_SHARE = 0.05  # more than 5% of CPU time stolen by the hypervisor during a run
MIN_REPEATS = 3
TRAIN_FLOPS_FACTOR = 3  # forward + backward (about twice the forward) per sample
ENV_FIELDS = (
    "cpu",
    "cpu_count",
    "gpu",
    "gpus",
    "gpu_driver_version",
    "cuda_version",
    "nccl_version",
    "torch_version",
    "slurm_version",
    "nodes",
    "commit",
)


def environment_table(loaded: list[RunLog]) -> pd.DataFrame:
    """One row per run: CPU model and count, GPU model and count, driver, CUDA, NCCL, torch, Slurm, nodes, commit."""
    rows = []
    for run in loaded:
        headers = _rank_headers(run)
        if not headers:
            continue
        h = headers[0]
        hosts = sorted({str(x.get("host")) for x in headers if x.get("host")})
        cuda = [x for x in headers if str(x.get("device", "")).startswith("cuda")]
        rows.append(
            {
                "run_id": run.run_id,
                "cpu": h.get("cpu_name") or (None if cuda else h.get("device_name")),
                "cpu_count": h.get("cpu_count"),
                "gpu": cuda[0].get("device_name") if cuda else None,
                "gpus": len(cuda),
                "gpu_driver_version": h.get("gpu_driver_version"),
                "cuda_version": h.get("cuda_version"),
                "nccl_version": h.get("nccl_version"),
                "torch_version": h.get("torch_version"),
                "slurm_version": h.get("slurm_version"),
                "nodes": h.get("node_list") or ",".join(hosts),
                "commit": (h.get("git_sha") or "")[:12] or None,
            }
        )
    return pd.DataFrame(rows, columns=["run_id", *ENV_FIELDS])


def environment_summary(env: pd.DataFrame) -> list[str]:
    """One line per field: its value when every run agrees, else the distinct values."""
    lines = []
    for column in ENV_FIELDS:
        values = (
            sorted({str(v) for v in env[column] if v is not None and v == v and v != ""}) if len(env) else []
        )
        shown = values[0] if len(values) == 1 else (", ".join(values) if values else "not recorded")
        lines.append(f"{column}: {shown}")
    return lines


def honesty_checks(runs: pd.DataFrame, loaded: list[RunLog], scaling: pd.DataFrame) -> list[str]:
    """Every reason to doubt a timing: oversubscribed CPUs, overlapping runs, a busy machine, few repeats and
    speedups below 1. An empty list means none was found."""
    found: list[str] = []
    for run in loaded:
        found += _oversubscribed(run) + _busy(run)
    found += _overlaps(loaded)
    for row in scaling.itertuples(index=False) if len(scaling) else []:
        if row.repeats < MIN_REPEATS:
            found.append(
                f"{row.series} at N={row.world_size}: {row.repeats} repeat(s), fewer than {MIN_REPEATS}: no spread "
                "is drawn and the point is one measurement"
            )
        if row.world_size > row.baseline_world_size and row.speedup < 1:
            found.append(
                f"{row.series} at N={row.world_size}: speedup {row.speedup:.2f} < 1: more ranks made it slower"
            )
    return found


def _rank_headers(run: RunLog) -> list[dict[str, Any]]:
    """The first header of every rank log."""
    return run.rank_headers or run.headers[:1]


def _oversubscribed(run: RunLog) -> list[str]:
    by_host: dict[str, list[dict[str, Any]]] = {}
    for h in _rank_headers(run):
        by_host.setdefault(str(h.get("host")), []).append(h)
    out = []
    for host, headers in by_host.items():
        ranks = max(len(headers), int(headers[0].get("local_world_size") or 1))
        threads = int(headers[0].get("threads_per_rank") or 0)
        cpus = headers[0].get("cpus_available") or headers[0].get("cpu_count")
        if threads and cpus and ranks * threads > cpus:
            out.append(
                f"{run.run_id} on {host}: {ranks} ranks x {threads} threads = {ranks * threads} > {cpus} CPUs "
                "available: the ranks competed for cores"
            )
    return out


def _busy(run: RunLog) -> list[str]:
    h, end = run.header, run.end or {}
    cpus = h.get("cpus_available") or h.get("cpu_count")
    out = []
    for when, rec in (("at the start", h), ("at the end", end)):
        load = rec.get("load_avg_1m")
        if isinstance(load, int | float) and cpus and load > LOAD_PER_CPU * cpus:
            out.append(f"{run.run_id}: load average {load:.1f} {when} on {cpus} CPUs: a busy machine")
    steal = _steal_share(h, end)
    if steal is not None and steal > STEAL_SHARE:
        out.append(f"{run.run_id}: {steal:.0%} of CPU time was stolen by the hypervisor during the run")
    return out


def _steal_share(header: dict[str, Any], end: dict[str, Any]) -> float | None:
    try:
        steal = end["cpu_steal_jiffies"] - header["cpu_steal_jiffies"]
        total = end["cpu_total_jiffies"] - header["cpu_total_jiffies"]
    except (KeyError, TypeError):
        return None
    return steal / total if total > 0 else None


def _overlaps(loaded: list[RunLog]) -> list[str]:
    """Pairs of runs whose logged time spans overlap on a shared host: each slowed the other."""
    spans = []
    for run in loaded:
        if not run.segment_times:
            continue
        hosts = {str(h.get("host")) for h in _rank_headers(run) if h.get("host")}
        for first, last in run.segment_times.values():
            spans.append((first, last, run.run_id, hosts))
    spans.sort()
    out = []
    for i, (_a0, a1, name_a, hosts_a) in enumerate(spans):
        for b0, _b1, name_b, hosts_b in spans[i + 1 :]:
            if b0 >= a1:
                break
            shared = hosts_a & hosts_b
            if name_a != name_b and shared:
                out.append(
                    f"{name_a} and {name_b} ran at the same time on {', '.join(sorted(shared))} "
                    f"({min(a1, _b1) - b0:.0f} s overlap): their step times are not independent"
                )
    return out


def utilisation_table(runs: pd.DataFrame, loaded: list[RunLog]) -> pd.DataFrame:
    """Achieved FLOP/s per device (training FLOPs per sample x throughput / ranks) and MFU against the device
    peak of the header (a GPU's data sheet, or the CPU's measured matmul rate)."""
    rows = []
    for row, run in zip(runs.itertuples(index=False), loaded, strict=True):
        h = run.header
        flops = h.get("flops_per_sample")
        thr = getattr(row, "throughput", math.nan)
        if not (flops and row.world_size and thr == thr):
            continue
        achieved = TRAIN_FLOPS_FACTOR * float(flops) * float(thr) / float(row.world_size)
        peak = h.get("peak_flops")
        rows.append(
            {
                "run_id": row.run_id,
                "series": row.series,
                "world_size": row.world_size,
                "tflops_per_device": achieved / 1e12,
                "peak_tflops": float(peak) / 1e12 if peak else math.nan,
                "peak_source": h.get("peak_flops_source"),
                "mfu": achieved / float(peak) if peak else math.nan,
            }
        )
    return pd.DataFrame(rows)


def straggler_table(loaded: list[RunLog]) -> pd.DataFrame:
    """Per run: the spread of the ranks' median step times and the slowest rank and its host."""
    rows = []
    for run in loaded:
        ranks = run.ranks
        if len(ranks) < 2 or "step_s_median" not in ranks or ranks["step_s_median"].isna().all():
            continue
        medians = ranks["step_s_median"].to_numpy(float)
        slow = int(np.nanargmax(medians))
        rows.append(
            {
                "run_id": run.run_id,
                "ranks": len(ranks),
                "step_s_fastest": float(np.nanmin(medians)),
                "step_s_slowest": float(np.nanmax(medians)),
                "spread": float(np.nanmax(medians) / np.nanmin(medians) - 1),
                "slowest_rank": int(ranks["rank"].iloc[slow]),
                "slowest_host": ranks["host"].iloc[slow],
            }
        )
    return pd.DataFrame(rows)
