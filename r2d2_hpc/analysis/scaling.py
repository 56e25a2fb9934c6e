"""Per-study tables: speedup, efficiency, Karp-Flatt, the fitted model and its projections, time split, Dice, cost.

A *series* is one model under one scaling mode at one batch setting (the global batch for strong scaling, the
per-rank batch for weak); its *points* are the scales (world size, nodes) it was run at, each with its repeats.
Against the baseline point N0 (the smallest world size by default):

- speedup S(N) = X(N) / X(N0), X the throughput in samples/s. Under strong scaling the global batch, hence the
  steps per epoch, is the same at every scale, so this is also T_epoch(N0) / T_epoch(N); under weak scaling it
  is the throughput per rank, times N / N0.
- efficiency E(N) = S(N) / (N / N0).
- Karp-Flatt serial fraction e(N) = (1/S - 1/p) / (1 - 1/p), p = N / N0 (defined for p > 1).

Spreads over repeats: the point's median with min and max (each repeat divided by the baseline's median), and a
bootstrap 95% interval of the ratio of medians when both points have two or more repeats.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from r2d2_hpc.analysis.model import StepTimeModel, batch_at, fit_step_time_model

PROJECTION_FACTORS = (2, 4)


def series_label(model: str, scaling: str, global_batch: Any, batch_per_rank: Any) -> str:
    """A short readable name of a series, e.g. ``unet strong G=32`` or ``unet weak b=8/rank``."""
    if scaling == "strong":
        return f"{model} strong G={_int(global_batch)}"
    if scaling == "weak":
        return f"{model} weak b={_int(batch_per_rank)}/rank"
    return f"{model} {scaling}"


def add_series(runs: pd.DataFrame) -> pd.DataFrame:
    """Adds the ``series`` column to the per-run table."""
    runs = runs.copy()
    runs["series"] = [
        series_label(r.model, r.scaling, r.global_batch, r.batch_per_rank)
        for r in runs.itertuples(index=False)
    ]
    return runs


def choose_baseline(points: pd.DataFrame, mode: str) -> tuple[int, int | None, str]:
    """The baseline (world size, nodes) of a series' usable runs, and a note when the mode had to fall back."""
    ordered = points.sort_values(["world_size", "nodes"], na_position="last")
    note = ""
    chosen = ordered.iloc[0]
    if mode == "single-node":
        one_node = ordered[ordered["nodes"] == 1]
        if len(one_node):
            chosen = one_node.iloc[-1]
        else:
            note = "no single-node run: baseline is the smallest scale"
    elif mode.isdigit():
        match = ordered[ordered["world_size"] == int(mode)]
        if len(match):
            chosen = match.iloc[0]
        else:
            note = f"no run at world size {mode}: baseline is the smallest scale"
    nodes = None if pd.isna(chosen["nodes"]) else int(chosen["nodes"])
    return int(chosen["world_size"]), nodes, note


def karp_flatt(speedup: float, p: float) -> float:
    """The experimentally determined serial fraction (Karp and Flatt 1990); NaN for p <= 1."""
    if not (p > 1 and speedup > 0):
        return math.nan
    return (1 / speedup - 1 / p) / (1 - 1 / p)


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, samples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95% bootstrap interval of median(num) / median(den) resampling both; NaN when either has < 2 values."""
    if samples <= 0 or len(num) < 2 or len(den) < 2:
        return math.nan, math.nan
    a = np.median(rng.choice(num, size=(samples, len(num))), axis=1)
    b = np.median(rng.choice(den, size=(samples, len(den))), axis=1)
    lo, hi = np.percentile(a / b, [2.5, 97.5])
    return float(lo), float(hi)


def scaling_table(
    runs: pd.DataFrame, baseline: str, bootstrap: int, seed: int
) -> tuple[pd.DataFrame, list[str]]:
    """One row per series and scale with throughput, speedup, efficiency, Karp-Flatt and their spreads."""
    rng = np.random.default_rng(seed)
    rows, notes = [], []
    usable = runs[runs["timing_ok"]]
    for series, group in usable.groupby("series", sort=True):
        ws0, nodes0, note = choose_baseline(group, baseline)
        if note:
            notes.append(f"{series}: {note}")
        base = _at(group, ws0, nodes0)["throughput"].to_numpy()
        base_median = float(np.median(base))
        for (ws, nodes), point in group.groupby(["world_size", "nodes"], sort=True, dropna=False):
            rows.append(_point_row(series, point, ws, nodes, ws0, nodes0, base, base_median, bootstrap, rng))
    table = pd.DataFrame(rows)
    return (
        table.sort_values(["series", "world_size", "nodes"]).reset_index(drop=True) if rows else table
    ), notes


def _point_row(
    series: str,
    point: pd.DataFrame,
    ws: float,
    nodes: float,
    ws0: int,
    nodes0: int | None,
    base: np.ndarray,
    base_median: float,
    bootstrap: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    first = point.iloc[0]
    thr = point["throughput"].to_numpy()
    p = ws / ws0
    per_repeat = thr / base_median
    speedup = float(np.median(thr)) / base_median
    lo, hi = bootstrap_ratio(thr, base, bootstrap, rng)
    return {
        "series": series,
        "model": first["model"],
        "scaling": first["scaling"],
        "global_batch": first["global_batch"],
        "batch_per_rank": first["batch_per_rank"],
        "nodes": nodes,
        "world_size": int(ws),
        "repeats": len(point),
        "throughput": float(np.median(thr)),
        "throughput_min": float(thr.min()),
        "throughput_max": float(thr.max()),
        "throughput_per_rank": float(np.median(thr)) / ws,
        "step_s_median": float(point["step_s_median"].median()),
        "step_s_p90": float(point["step_s_p90"].median()),
        "epoch_time_s": float(point["epoch_time_s"].median()),
        "speedup": speedup,
        "speedup_min": float(per_repeat.min()),
        "speedup_max": float(per_repeat.max()),
        "speedup_ci_low": lo,
        "speedup_ci_high": hi,
        "efficiency": speedup / p,
        "efficiency_min": float(per_repeat.min()) / p,
        "efficiency_max": float(per_repeat.max()) / p,
        "karp_flatt": karp_flatt(speedup, p),
        "baseline_world_size": ws0,
        "baseline_nodes": nodes0,
    }


def _at(group: pd.DataFrame, ws: int, nodes: int | None) -> pd.DataFrame:
    match = group[group["world_size"] == ws]
    return match[match["nodes"] == nodes] if nodes is not None and (match["nodes"] == nodes).any() else match


def fit_models(runs: pd.DataFrame) -> dict[str, StepTimeModel]:
    """One fitted :class:`StepTimeModel` per series that has two or more scales and known gradient bytes."""
    models = {}
    for series, group in runs[runs["timing_ok"]].groupby("series", sort=True):
        grad_bytes = group["grad_bytes"].dropna()
        if not len(grad_bytes):
            continue
        model = fit_step_time_model(
            group["world_size"].to_numpy(float),
            group["batch_per_rank"].to_numpy(float),
            group["step_s_mean"].to_numpy(float),
            float(grad_bytes.iloc[0]),
        )
        if model is not None:
            models[series] = model
    return models


def fit_table(models: dict[str, StepTimeModel]) -> pd.DataFrame:
    """The fitted parameters, one row per series."""
    rows = [
        {
            "series": series,
            "compute_s_per_sample": m.compute_s_per_sample,
            "bandwidth_gb_per_s": m.bandwidth_bytes_per_s / 1e9,
            "latency_us": m.latency_s * 1e6,
            "grad_mib": m.grad_bytes / 2**20,
            "points": m.num_points,
            "scales": m.num_scales,
            "latency_fitted": m.fitted_latency,
            "rmse_ms": m.rmse_s * 1e3,
        }
        for series, m in models.items()
    ]
    return pd.DataFrame(rows)


def model_curves(scaling: pd.DataFrame, models: dict[str, StepTimeModel]) -> tuple[pd.DataFrame, list[str]]:
    """Modelled speedup and efficiency over the measured range (``fit``) and at 2x and 4x the largest measured
    world size (``projection``), relative to the measured baseline median."""
    rows, notes = [], []
    for series, model in models.items():
        points = scaling[scaling["series"] == series]
        if points.empty:
            continue
        first = points.iloc[0]
        ws0, base = int(first["baseline_world_size"]), points.loc[points["world_size"].idxmin()]
        base_thr = float(points[points["world_size"] == ws0]["throughput"].median())
        ws_max = int(points["world_size"].max())
        grid = sorted(set(points["world_size"].astype(int)) | set(_powers_of_two(ws0, ws_max)))
        targets = [(n, "fit") for n in grid] + [(f * ws_max, "projection") for f in PROJECTION_FACTORS]
        for n, kind in targets:
            b = float(batch_at(first["scaling"], n, first["global_batch"], base["batch_per_rank"]))
            if first["scaling"] == "strong" and b < 1:
                notes.append(
                    f"{series}: no projection at {n} ranks (global batch {_int(first['global_batch'])} < {n})"
                )
                continue
            step_s = float(model.step_time_s(n, b))
            thr = b * n / step_s
            rows.append(
                {
                    "series": series,
                    "world_size": n,
                    "kind": kind,
                    "batch_per_rank": b,
                    "step_s": step_s,
                    "comm_s": float(model.comm_time_s(n)),
                    "throughput": thr,
                    "speedup": thr / base_thr,
                    "efficiency": thr / base_thr / (n / ws0),
                }
            )
    return pd.DataFrame(rows), notes


def breakdown_table(runs: pd.DataFrame, models: dict[str, StepTimeModel]) -> pd.DataFrame:
    """Median seconds per step in data wait, compute, modelled communication (taken out of compute, where the
    all-reduce happens) and other, per series and scale."""
    rows = []
    for (series, ws, nodes), point in runs[runs["timing_ok"]].groupby(
        ["series", "world_size", "nodes"], dropna=False
    ):
        compute = float(point["compute_s"].median())
        comm = float(models[series].comm_time_s(ws)) if series in models else math.nan
        comm = min(comm, compute) if comm == comm else comm
        rows.append(
            {
                "series": series,
                "world_size": int(ws),
                "nodes": nodes,
                "step_s": float(point["step_s_mean"].median()),
                "step_s_min": float(point["step_s_mean"].min()),
                "step_s_max": float(point["step_s_mean"].max()),
                "data_wait_s": float(point["data_wait_s"].median()),
                "compute_s": compute - (comm if comm == comm else 0.0),
                "comm_model_s": comm,
                "other_s": float(point["other_s"].median()),
                "data_wait_share": float(point["data_wait_share"].median()),
            }
        )
    return pd.DataFrame(rows)


def quality_table(runs: pd.DataFrame, scaling: pd.DataFrame) -> pd.DataFrame:
    """Final Dice, time and cost to the target and cost to finish per series and scale (completed runs)."""
    rows = []
    bases = scaling.groupby("series")["baseline_world_size"].first().to_dict() if len(scaling) else {}
    for (series, ws, nodes), point in runs.groupby(["series", "world_size", "nodes"], dropna=False):
        done = point[point["status"] == "completed"]
        dice = done["final_dice"].dropna()
        reached = point["tta_s"].dropna()
        rows.append(
            {
                "series": series,
                "world_size": int(ws) if ws == ws else ws,
                "nodes": nodes,
                "runs": len(point),
                "completed": len(done),
                "dice": float(dice.median()) if len(dice) else math.nan,
                "dice_min": float(dice.min()) if len(dice) else math.nan,
                "dice_max": float(dice.max()) if len(dice) else math.nan,
                "target_dice": float(point["target_dice"].iloc[0]),
                "reached_target": f"{len(reached)}/{len(point)}",
                **_spread("tta_s", reached),
                **_spread("cost_to_target_hours", point["cost_to_target_hours"].dropna()),
                **_spread("cost_hours", done["cost_hours"].dropna()),
                "cost_unit": "/".join(sorted(set(point["cost_unit"].dropna()))),
                "queue_wait_s": float(point["queue_wait_s"].median()),
                "baseline_world_size": bases.get(series, math.nan),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    base = table[table["world_size"] == table["baseline_world_size"]].set_index("series")["dice"]
    table["dice_change"] = table["dice"] - table["series"].map(base)
    return table.sort_values(["series", "world_size"]).reset_index(drop=True)


def _spread(name: str, values: pd.Series) -> dict[str, float]:
    """Median, min and max of ``values`` as ``name``, ``name_min``, ``name_max`` (NaN when empty)."""
    if not len(values):
        return {name: math.nan, f"{name}_min": math.nan, f"{name}_max": math.nan}
    return {
        name: float(values.median()),
        f"{name}_min": float(values.min()),
        f"{name}_max": float(values.max()),
    }


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, n = [], 1
    while n <= 4 * hi:
        if n >= lo:
            out.append(n)
        n *= 2
    return [n for n in out if n <= hi]


def _int(value: Any) -> str:
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return "?"
