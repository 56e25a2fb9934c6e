"""The report's plots, drawn on plain ``matplotlib.figure.Figure`` objects (Agg, no pyplot state, no display).

Each function takes the tables of :mod:`r2d2_hpc.analysis.scaling` and returns a Figure, or None when there is
nothing to draw (a single-scale study has no speedup plot). Measured points carry min-max error bars over
repeats; the fitted model is dashed and its points beyond the measured scales are hollow and labelled
"projection"; published figures are grey.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from r2d2_hpc.analysis.reference import reference_label

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
REF_MARKERS = ("s", "D", "^", "v", "P", "X", "*", "h")
DPI = 200
MIN_REPEATS_FOR_SPREAD = 3


def new_figure(width_in: float = 7.0, height_in: float = 4.5, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure with an Agg canvas and ``ncols`` axes side by side."""
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG at :data:`DPI` dots per inch."""
    return figure_bytes(fig, "png")


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure as ``png`` (at :data:`DPI`), ``svg`` or ``pdf``."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    return buf.getvalue()


def _plain_log_y(ax: Axes) -> None:
    """Tick labels on a log y axis as plain numbers (``4``, ``0.5``), never ``4 x 10^0``."""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _color(series: list[str], name: str) -> str:
    return COLORS[series.index(name) % len(COLORS)]


def _log2_x(ax: Axes, values: list[float]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({int(v) for v in values if v and v == v})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()


def _measured(ax: Axes, scaling: pd.DataFrame, column: str, series: list[str]) -> None:
    """Measured medians; min-max bars only where a point has at least :data:`MIN_REPEATS_FOR_SPREAD` repeats."""
    for name, points in scaling.groupby("series", sort=True):
        y = points[column].to_numpy()
        err = np.vstack([y - points[f"{column}_min"].to_numpy(), points[f"{column}_max"].to_numpy() - y])
        if "repeats" in points:
            err = err * (points["repeats"].to_numpy() >= MIN_REPEATS_FOR_SPREAD)
        ax.errorbar(
            points["world_size"],
            y,
            yerr=np.clip(err, 0, None),
            fmt="o-",
            capsize=3,
            color=_color(series, name),
            label=f"{name} (measured)",
        )


def _modelled(ax: Axes, curves: pd.DataFrame, column: str, series: list[str]) -> None:
    if curves is None or curves.empty:
        return
    for name, curve in curves.groupby("series", sort=True):
        color = _color(series, name)
        ax.plot(curve["world_size"], curve[column], "--", color=color, linewidth=1, label=f"{name} (model)")
        proj = curve[curve["kind"] == "projection"]
        if f"{column}_low" in proj and len(proj):
            low, high = proj[f"{column}_low"].to_numpy(float), proj[f"{column}_high"].to_numpy(float)
            y = proj[column].to_numpy(float)
            ax.errorbar(
                proj["world_size"],
                y,
                yerr=np.clip(np.vstack([y - low, np.nan_to_num(high - y, posinf=0.0)]), 0, None),
                fmt="none",
                ecolor=color,
                elinewidth=1,
                capsize=4,
                label=f"{name} (95% prediction interval)",
            )
        ax.plot(
            proj["world_size"],
            proj[column],
            "o",
            mfc="none",
            color=color,
            linestyle="none",
            label=f"{name} (projection)",
        )
        for row in proj.itertuples(index=False):
            ax.annotate(
                "projection",
                (row.world_size, getattr(row, column)),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )


def _references(ax: Axes, refs: pd.DataFrame | None, column: str, horizontal: bool) -> list[float]:
    """Reference points (grey) and, for rows without a scale, horizontal lines; returns their x values."""
    if refs is None or refs.empty:
        return []
    xs = []
    rows = refs[refs[column].notna()]
    for i, (label, group) in enumerate(rows.groupby(rows.apply(reference_label, axis=1), sort=True)):
        placed = group[group["num_gpus"].notna() & (group["num_gpus"] > 1)]
        if len(placed):
            ax.plot(
                placed["num_gpus"],
                placed[column],
                REF_MARKERS[i % len(REF_MARKERS)],
                color="0.45",
                linestyle="none",
                label=f"{label} (published)",
            )
            xs += list(placed["num_gpus"])
        elif horizontal:
            for value in group[column]:
                ax.axhline(value, color="0.45", linestyle=":", linewidth=1)
                ax.annotate(
                    f"{label}: {value:g} (published, scale n/a)",
                    (0.01, value),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    color="0.35",
                    va="bottom",
                )
    return xs


def _scaling_axes(
    scaling: pd.DataFrame,
    curves: pd.DataFrame | None,
    refs: pd.DataFrame | None,
    metric: str,
    horizontal_refs: bool,
) -> tuple[Figure, Any, list]:
    """A figure with the measured points, the fitted model and the references of one metric; the x values used."""
    series = sorted(scaling["series"].unique())
    fig, (ax,) = new_figure()
    _measured(ax, scaling, metric, series)
    _modelled(ax, curves, metric, series)
    xs = list(scaling["world_size"]) + _references(ax, refs, metric, horizontal=horizontal_refs)
    if curves is not None and not curves.empty:
        xs += list(curves["world_size"])
    return fig, ax, xs


def plot_speedup(
    scaling: pd.DataFrame, curves: pd.DataFrame | None = None, refs: pd.DataFrame | None = None
) -> Figure | None:
    """Speedup against world size with the ideal line N / N0; None without two scales in some series."""
    if not _has_scaling(scaling):
        return None
    fig, ax, xs = _scaling_axes(scaling, curves, refs, "speedup", horizontal_refs=True)
    for ws0 in sorted(scaling["baseline_world_size"].unique()):
        grid = np.array(sorted({x for x in xs if x >= ws0}), dtype=float)
        ax.plot(grid, grid / ws0, "k:", linewidth=1, label=f"ideal (N / {ws0})")
    _log2_x(ax, xs)
    ax.set_yscale("log", base=2)
    _plain_log_y(ax)
    ax.set(xlabel="ranks (world size N)", ylabel="speedup S(N) = X(N) / X(N0)", title="Speedup")
    ax.legend(fontsize=7)
    return fig


def plot_efficiency(
    scaling: pd.DataFrame, curves: pd.DataFrame | None = None, refs: pd.DataFrame | None = None
) -> Figure | None:
    """Efficiency S(N) / (N / N0) against world size, with 1.0 marked."""
    if not _has_scaling(scaling):
        return None
    fig, ax, xs = _scaling_axes(scaling, curves, refs, "efficiency", horizontal_refs=False)
    ax.axhline(1.0, color="k", linestyle=":", linewidth=1, label="ideal")
    _log2_x(ax, xs)
    ax.set_ylim(0, max(1.1, float(np.nanmax(scaling["efficiency_max"])) * 1.05))
    ax.set(
        xlabel="ranks (world size N)", ylabel="efficiency E(N) = S(N) / (N / N0)", title="Scaling efficiency"
    )
    ax.legend(fontsize=7)
    return fig


def plot_throughput(scaling: pd.DataFrame) -> Figure | None:
    """Global samples per second against world size (log-log)."""
    if scaling.empty:
        return None
    series = sorted(scaling["series"].unique())
    fig, (ax,) = new_figure()
    _measured(ax, scaling, "throughput", series)
    _log2_x(ax, list(scaling["world_size"]))
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set(xlabel="ranks (world size N)", ylabel="throughput X(N) [samples/s]", title="Throughput")
    ax.legend(fontsize=7)
    return fig


def plot_breakdown(breakdown: pd.DataFrame) -> Figure | None:
    """Stacked seconds per step as measured (data wait, compute, exposed communication, other) per series and
    scale; min-max bars only with 3+ repeats."""
    if breakdown.empty:
        return None
    table = breakdown.sort_values(["series", "world_size"]).reset_index(drop=True)
    labels = [f"{r.series}\nN={r.world_size}" for r in table.itertuples(index=False)]
    fig, (ax,) = new_figure(max(7.0, 0.6 * len(table) + 2), 4.5)
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    parts = (
        ("data_wait_s", "data wait", "#ff7f0e", None),
        ("compute_s", "compute", "#1f77b4", None),
        ("exposed_comm_s", "exposed communication (measured)", "#9ecae1", "//"),
        ("other_s", "other (step bookkeeping)", "#bbbbbb", None),
    )
    for column, label, color, hatch in parts:
        values = np.nan_to_num(table[column].to_numpy(float))
        if column == "exposed_comm_s" and not values.any():
            continue
        ax.bar(x, values, bottom=bottom, color=color, hatch=hatch, label=label, edgecolor="white")
        bottom += values
    step_s = table["step_s"].to_numpy(float)
    spread = np.vstack(
        [step_s - table["step_s_min"].to_numpy(float), table["step_s_max"].to_numpy(float) - step_s]
    )
    if "repeats" in table and (table["repeats"] >= MIN_REPEATS_FOR_SPREAD).any():
        spread = spread * (table["repeats"].to_numpy() >= MIN_REPEATS_FOR_SPREAD)
        ax.errorbar(
            x,
            step_s,
            yerr=np.clip(spread, 0, None),
            fmt="none",
            ecolor="k",
            capsize=3,
            label="min-max step time",
        )
    ax.set_xticks(x, labels, fontsize=7, rotation=30 if len(table) > 6 else 0)
    ax.set(ylabel="seconds per step (median over repeats)", title="Where a step's time goes")
    ax.legend(fontsize=7)
    return fig


def plot_dice(quality: pd.DataFrame) -> Figure | None:
    """Final mean foreground Dice against world size (completed runs; min-max over repeats)."""
    table = quality.dropna(subset=["dice"]) if not quality.empty else quality
    if table.empty:
        return None
    series = sorted(table["series"].unique())
    fig, (ax,) = new_figure()
    for name, points in table.groupby("series", sort=True):
        y = points["dice"].to_numpy()
        err = np.vstack([y - points["dice_min"].to_numpy(), points["dice_max"].to_numpy() - y])
        ax.errorbar(
            points["world_size"],
            y,
            yerr=np.clip(err, 0, None),
            fmt="o-",
            capsize=3,
            color=_color(series, name),
            label=name,
        )
    _log2_x(ax, list(table["world_size"]))
    ax.set(xlabel="ranks (world size N)", ylabel="final mean foreground Dice", title="Accuracy against scale")
    ax.legend(fontsize=7)
    return fig


def plot_loss(curves: pd.DataFrame) -> Figure | None:
    """Training loss against samples seen, one panel per series, one colour per scale."""
    if curves.empty:
        return None
    names = sorted(curves["series"].unique())
    fig, axes = new_figure(max(7.0, 4.0 * len(names)), 4.0, ncols=len(names))
    for ax, name in zip(axes, names, strict=True):
        sub = curves[curves["series"] == name]
        scales = sorted(sub["world_size"].unique())
        for i, ws in enumerate(scales):
            for j, (_, run) in enumerate(sub[sub["world_size"] == ws].groupby("run_id", sort=True)):
                ax.plot(
                    run["samples_seen"],
                    run["loss"],
                    color=COLORS[i % len(COLORS)],
                    linewidth=1,
                    alpha=0.8,
                    label=f"N={ws}" if j == 0 else None,
                )
        ax.set(xlabel="samples seen", ylabel="training loss", title=name)
        ax.legend(fontsize=7)
    return fig


def plot_cost(quality: pd.DataFrame) -> Figure | None:
    """Time to the target Dice, and cost to the target and to the end of the run, against world size."""
    if quality.empty or not (quality["tta_s"].notna().any() or quality["cost_hours"].notna().any()):
        return None
    series = sorted(quality["series"].unique())
    fig, (ax_t, ax_c) = new_figure(10.0, 4.0, ncols=2)
    for name, points in quality.groupby("series", sort=True):
        color = _color(series, name)
        x = points["world_size"].to_numpy(float)
        _spread_line(ax_t, x, points, "tta_s", 1 / 3600, "o-", color, name)
        _spread_line(ax_c, x, points, "cost_to_target_hours", 1.0, "o-", color, f"{name}: to target")
        _spread_line(ax_c, x, points, "cost_hours", 1.0, "s--", color, f"{name}: whole run")
    units = "/".join(sorted(set(quality["cost_unit"].dropna()))) or "hours"
    for ax in (ax_t, ax_c):
        _log2_x(ax, list(quality["world_size"]))
        ax.legend(fontsize=7)
    ax_t.set(xlabel="ranks (world size N)", ylabel="hours", title="Time to the target Dice")
    ax_c.set(xlabel="ranks (world size N)", ylabel=units, title="Cost")
    return fig


def _spread_line(
    ax: Axes, x: np.ndarray, points: pd.DataFrame, column: str, scale: float, fmt: str, color: str, label: str
) -> None:
    """Median with min-max error bars over repeats."""
    y = points[column].to_numpy(float) * scale
    err = np.vstack(
        [
            y - points[f"{column}_min"].to_numpy(float) * scale,
            points[f"{column}_max"].to_numpy(float) * scale - y,
        ]
    )
    ax.errorbar(x, y, yerr=np.nan_to_num(np.clip(err, 0, None)), fmt=fmt, capsize=3, color=color, label=label)


def _has_scaling(scaling: pd.DataFrame) -> bool:
    return not scaling.empty and bool((scaling.groupby("series")["world_size"].nunique() > 1).any())
