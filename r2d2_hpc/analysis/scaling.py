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

from r2d2_hpc.analysis.model import MIN_SCALES, StepTimeModel, batch_at, fit_step_time_model

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


def fit_models(runs: pd.DataFrame) -> tuple[dict[str, StepTimeModel], list[str]]:
    """One fitted :class:`StepTimeModel` per series with at least ``MIN_SCALES`` scales and known gradient bytes;
    a note for every series that has too few."""
    models, notes = {}, []
    for series, group in runs[runs["timing_ok"]].groupby("series", sort=True):
        grad_bytes = group["grad_bytes"].dropna()
        scales = group[["world_size", "nodes"]].drop_duplicates()
        if len(scales) < MIN_SCALES:
            if len(scales) > 1:
                notes.append(
                    f"{series}: {len(scales)} scales measured; the step-time model needs at least {MIN_SCALES} "
                    "(with two, any two-term law fits exactly): no model, no projection"
                )
            continue
        if not len(grad_bytes):
            notes.append(f"{series}: the logs give no gradient bytes: no model, no projection")
            continue
        model = fit_step_time_model(
            group["world_size"].to_numpy(float),
            group["batch_per_rank"].to_numpy(float),
            group["step_s_mean"].to_numpy(float),
            float(grad_bytes.iloc[0]),
            group["nodes"].to_numpy(float),
        )
        if model is not None:
            models[series] = model
    return models, notes


def fit_table(models: dict[str, StepTimeModel]) -> pd.DataFrame:
    """The chosen form and fitted parameters, one row per series."""
    rows = [
        {
            "series": series,
            "form": m.name,
            "loo_error": m.loo_error,
            "loo_max_error": m.loo_max_error,
            "compute_s_per_sample": m.compute_s_per_sample,
            "constant_ms": m.constant_s * 1e3,
            "bandwidth_gb_per_s": m.bandwidth_bytes_per_s / 1e9,
            "latency_us": m.latency_s * 1e6,
            "bandwidth_inter_gb_per_s": (1 / m.coef["bandwidth_inter"] / 1e9)
            if m.coef.get("bandwidth_inter", 0) > 0
            else math.nan,
            "latency_inter_us": m.coef.get("latency_inter", math.nan) * 1e6,
            "grad_mib": m.grad_bytes / 2**20,
            "points": m.num_points,
            "scales": m.num_scales,
            "rmse_ms": m.rmse_s * 1e3,
            "candidates": "; ".join(f"{name}: {err:.3g}" for name, err in m.candidates.items()),
            "equivalent_forms": "; ".join(m.equivalent),
        }
        for series, m in models.items()
    ]
    return pd.DataFrame(rows)


def model_curves(scaling: pd.DataFrame, models: dict[str, StepTimeModel]) -> tuple[pd.DataFrame, list[str]]:
    """Modelled speedup and efficiency over the measured range (``fit``) and at 2x and 4x the largest measured
    world size (``projection``, with the model's 95% prediction interval), relative to the measured baseline."""
    rows, notes = [], []
    for series, model in models.items():
        points = scaling[scaling["series"] == series]
        if points.empty:
            continue
        first = points.iloc[0]
        ws0, base = int(first["baseline_world_size"]), points.loc[points["world_size"].idxmin()]
        base_thr = float(points[points["world_size"] == ws0]["throughput"].median())
        ws_max = int(points["world_size"].max())
        nodes_max = float(points["nodes"].max()) if points["nodes"].notna().any() else 1.0
        per_node = max(ws_max / nodes_max, 1.0)
        grid = sorted(set(points["world_size"].astype(int)) | set(_powers_of_two(ws0, ws_max)))
        targets = [(n, "fit") for n in grid] + [(f * ws_max, "projection") for f in PROJECTION_FACTORS]
        for n, kind in targets:
            b = float(batch_at(first["scaling"], n, first["global_batch"], base["batch_per_rank"]))
            if first["scaling"] == "strong" and b < 1:
                notes.append(
                    f"{series}: no projection at {n} ranks (global batch {_int(first['global_batch'])} < {n})"
                )
                continue
            nodes = max(math.ceil(n / per_node), 1)
            step_s = float(model.step_time_s(n, b, nodes)[0])
            lo, hi = (float(v[0]) for v in model.interval_s(n, b, nodes))
            thr = b * n / step_s
            rows.append(
                {
                    "series": series,
                    "world_size": n,
                    "nodes": nodes,
                    "kind": kind,
                    "form": model.name,
                    "batch_per_rank": b,
                    "step_s": step_s,
                    "step_s_low": lo,
                    "step_s_high": hi,
                    "comm_s": float(model.comm_time_s(n, nodes)[0]),
                    "throughput": thr,
                    "speedup": thr / base_thr,
                    "speedup_low": b * n / hi / base_thr,
                    "speedup_high": b * n / lo / base_thr if lo > 0 else math.inf,
                    "efficiency": thr / base_thr / (n / ws0),
                    "efficiency_low": b * n / hi / base_thr / (n / ws0),
                    "efficiency_high": (b * n / lo / base_thr / (n / ws0)) if lo > 0 else math.inf,
                }
            )
    return pd.DataFrame(rows), notes


BREAKDOWN_PARTS = ("data_wait_s", "compute_s", "exposed_comm_s", "other_s")


def breakdown_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Median seconds per step in data wait, compute, exposed communication and other, as measured on the ranks
    (no model); ``comm_s`` is all the time an all-reduce was in flight, most of it hidden behind the backward pass.
    Logs that predate these measurements give NaN communication and a residual ``other_s``."""
    rows = []
    for (series, ws, nodes), point in runs[runs["timing_ok"]].groupby(
        ["series", "world_size", "nodes"], dropna=False
    ):
        row = {
            "series": series,
            "world_size": int(ws),
            "nodes": nodes,
            "step_s": float(point["step_s_mean"].median()),
            "step_s_min": float(point["step_s_mean"].min()),
            "step_s_max": float(point["step_s_mean"].max()),
            "repeats": len(point),
        }
        for part in (*BREAKDOWN_PARTS, "comm_s"):
            row[part] = float(point[part].median()) if part in point else math.nan
        row["measured_comm"] = bool(point["measured_comm"].all()) if "measured_comm" in point else False
        row["data_wait_share"] = float(point["data_wait_share"].median())
        rows.append(row)
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
