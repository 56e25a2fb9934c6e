"""Did scaling change convergence? Dice at an equal number of samples seen, over seeds (MLPerf's question).

A scaled run is compared with its series' baseline (the smallest scale) at the same number of training samples
seen, not at the same step: under weak scaling a step holds N times more samples. For each series the common
budget is the smallest number of samples that every completed run reached at an evaluation; each run
contributes the mean foreground Dice of its last evaluation within that budget. Repeats of a study train with
different seeds (``train.seed`` + repeat), so the spread over repeats is the spread over seeds.

Verdicts, from the difference of the means and its 95% Welch interval: ``changed`` (lower or higher) when the
interval excludes zero, ``no change detected`` when it does not, and ``too few seeds`` with fewer than 3 runs on
either side — then the difference is shown but no verdict is drawn.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from r2d2_hpc.analysis.load import RunLog
from r2d2_hpc.analysis.runs import mean_foreground

MIN_SEEDS = 3
COLUMNS = [
    "series",
    "world_size",
    "samples_seen",
    "runs",
    "seeds",
    "dice_mean",
    "dice_ci_low",
    "dice_ci_high",
    "dice_change",
    "change_ci_low",
    "change_ci_high",
    "verdict",
]


def eval_curve(run: RunLog) -> list[tuple[float, float]]:
    """(samples seen, mean foreground Dice) at each evaluation of ``run``, from its global batch."""
    batch = run.header.get("global_batch") or (run.result or {}).get("global_batch")
    if not batch:
        return []
    return [
        (float(rec.get("step", 0)) * float(batch), mean_foreground(rec.get("dice_per_class") or []))
        for rec in run.evals
        if rec.get("step")
    ]


def dice_at(curve: list[tuple[float, float]], samples: float) -> float:
    """The Dice of the last evaluation at or before ``samples`` samples seen (NaN when there is none)."""
    within = [dice for seen, dice in curve if seen <= samples and dice == dice]
    return within[-1] if within else math.nan


def convergence_table(runs: pd.DataFrame, loaded: list[RunLog]) -> pd.DataFrame:
    """One row per series and scale: Dice at the series' common samples budget, its interval and verdict."""
    done = [
        (row, run)
        for row, run in zip(runs.itertuples(index=False), loaded, strict=True)
        if row.status == "completed"
    ]
    rows = []
    for series in sorted({row.series for row, _ in done}):
        members = [(row, eval_curve(run), _seed(run)) for row, run in done if row.series == series]
        members = [m for m in members if m[1]]
        if not members:
            continue
        budget = min(curve[-1][0] for _, curve, _ in members)
        by_scale: dict[int, list[tuple[float, object]]] = {}
        for row, curve, seed in members:
            by_scale.setdefault(int(row.world_size), []).append((dice_at(curve, budget), seed))
        base = by_scale[min(by_scale)]
        for ws in sorted(by_scale):
            rows.append(_row(series, ws, budget, by_scale[ws], base))
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(series: str, ws: int, budget: float, values: list, base: list) -> dict:
    dice = np.array([v for v, _ in values if v == v], float)
    base_dice = np.array([v for v, _ in base if v == v], float)
    low, high = _interval(dice)
    change = float(dice.mean() - base_dice.mean()) if len(dice) and len(base_dice) else math.nan
    c_low, c_high, verdict = (
        _change(dice, base_dice) if values is not base else (math.nan, math.nan, "baseline")
    )
    return {
        "series": series,
        "world_size": ws,
        "samples_seen": budget,
        "runs": len(values),
        "seeds": len({s for _, s in values}),
        "dice_mean": float(dice.mean()) if len(dice) else math.nan,
        "dice_ci_low": low,
        "dice_ci_high": high,
        "dice_change": change if values is not base else 0.0,
        "change_ci_low": c_low,
        "change_ci_high": c_high,
        "verdict": verdict,
    }


def _interval(values: np.ndarray) -> tuple[float, float]:
    """95% Student-t interval of the mean (NaN with fewer than 2 values)."""
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _change(dice: np.ndarray, base: np.ndarray) -> tuple[float, float, str]:
    """95% Welch interval of mean(dice) - mean(base), and the verdict it supports."""
    if len(dice) < MIN_SEEDS or len(base) < MIN_SEEDS:
        return math.nan, math.nan, f"too few seeds (need {MIN_SEEDS} per scale)"
    va, vb = dice.var(ddof=1) / len(dice), base.var(ddof=1) / len(base)
    diff = float(dice.mean() - base.mean())
    if va + vb == 0:
        return (
            diff,
            diff,
            "no change detected" if diff == 0 else ("changed: higher" if diff > 0 else "changed: lower"),
        )
    dof = (va + vb) ** 2 / (va**2 / (len(dice) - 1) + vb**2 / (len(base) - 1))
    half = float(stats.t.ppf(0.975, dof) * math.sqrt(va + vb))
    low, high = diff - half, diff + half
    if high < 0:
        return low, high, "changed: lower"
    if low > 0:
        return low, high, "changed: higher"
    return low, high, "no change detected"


def _seed(run: RunLog) -> object:
    return ((run.config or {}).get("train") or {}).get("seed")
