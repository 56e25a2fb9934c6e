"""``analyse``: run directories in, a :class:`Report` out (pandas tables, PNG plots, Markdown and HTML).

Steps: find the runs, load them (in parallel), one row per run, series and their baselines, the time to each
series' target Dice, the scaling table, the fitted step-time model with projections, the time breakdown, Dice and
cost, the plots, then the CSV files, ``report.md`` and ``report.html`` in the output folder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from r2d2_hpc.analysis import plots
from r2d2_hpc.analysis import runs as run_metrics
from r2d2_hpc.analysis.checks import environment_table, honesty_checks, straggler_table, utilisation_table
from r2d2_hpc.analysis.convergence import convergence_table
from r2d2_hpc.analysis.document import build_document
from r2d2_hpc.analysis.jsonl import LogError
from r2d2_hpc.analysis.load import RunLog, discover_runs, load_runs
from r2d2_hpc.analysis.options import DEFAULT_TARGET_FRACTION, AnalysisOptions
from r2d2_hpc.analysis.reference import load_references
from r2d2_hpc.analysis.render import to_html, to_markdown
from r2d2_hpc.analysis.scaling import (
    add_series,
    breakdown_table,
    fit_models,
    fit_table,
    model_curves,
    quality_table,
    scaling_table,
)
from r2d2_hpc.errors import problem

log = logging.getLogger(__name__)
TABLES = (
    "runs",
    "scaling",
    "fits",
    "curves",
    "breakdown",
    "quality",
    "convergence",
    "dice",
    "ranks",
    "environment",
    "utilisation",
    "stragglers",
)
FIGURE_FORMATS = ("svg", "pdf")  # written beside every PNG


@dataclass
class Report:
    """Everything an analysis found. Tables are pandas DataFrames; ``figures`` maps names to PNG bytes.

    - ``runs``: one row per run (status, throughput, step-time median/p90, time shares, epoch time, Dice, time
      to target, Slurm accounting, cost);
    - ``scaling``: one row per series and scale (throughput, speedup, efficiency with spreads, Karp-Flatt);
    - ``fits`` / ``curves``: the fitted step-time model per series, and its curve and projections;
    - ``breakdown``: seconds per step in data wait, compute, modelled communication and other;
    - ``quality``: Dice, time and cost to the target Dice, cost to finish, per series and scale;
    - ``dice``: final Dice per run and class; ``ranks``: one row per rank log; ``loss``: loss curves;
    - ``convergence``: Dice at an equal number of samples seen per series and scale, over seeds, with a verdict.
    """

    inputs: list[Path]
    options: AnalysisOptions
    runs: pd.DataFrame
    scaling: pd.DataFrame
    fits: pd.DataFrame
    curves: pd.DataFrame
    breakdown: pd.DataFrame
    quality: pd.DataFrame
    dice: pd.DataFrame
    ranks: pd.DataFrame
    loss: pd.DataFrame
    convergence: pd.DataFrame = field(default_factory=pd.DataFrame)
    environment: pd.DataFrame = field(default_factory=pd.DataFrame)
    utilisation: pd.DataFrame = field(default_factory=pd.DataFrame)
    stragglers: pd.DataFrame = field(default_factory=pd.DataFrame)
    checks: list[str] = field(default_factory=list)
    references: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)
    vector_figures: dict[str, dict[str, bytes]] = field(default_factory=dict)  # name -> {svg, pdf}
    out: Path | None = None

    def markdown(self) -> str:
        """report.md's text."""
        return to_markdown(build_document(self))

    def html(self) -> str:
        """report.html's text: self-contained, plots embedded."""
        return to_html(build_document(self))

    def write(self, out: str | Path) -> list[Path]:
        """Writes the CSV tables, the PNG plots, report.md and report.html into ``out``; returns the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TABLES:
            path = out / ("scaling.csv" if name == "scaling" else f"{name}.csv")
            getattr(self, name).to_csv(path, index=False)
            written.append(path)
        for name, png in self.figures.items():
            (out / f"{name}.png").write_bytes(png)
            written.append(out / f"{name}.png")
            for fmt, data in self.vector_figures.get(name, {}).items():
                (out / f"{name}.{fmt}").write_bytes(data)
                written.append(out / f"{name}.{fmt}")
        doc = build_document(self)
        for name, text in (("report.md", to_markdown(doc)), ("report.html", to_html(doc))):
            (out / name).write_text(text, encoding="utf-8")
            written.append(out / name)
        self.out = out
        return written


def analyse(
    dirs: list[str | Path] | str | Path, out: str | Path | None = None, write: bool = True, **options: Any
) -> Report:
    """Analyses the runs below ``dirs`` and writes the report to ``out`` (default ``<first dir>/report``).

    Args:
        dirs: run directories, study directories, or both.
        out: the report folder.
        write: False computes the report without writing files.
        **options: fields of :class:`AnalysisOptions` (baseline, reference, warmup_steps, target_dice, ...).
    """
    inputs = [Path(d) for d in ([dirs] if isinstance(dirs, str | Path) else dirs)]
    opts = AnalysisOptions(out=Path(out) if out is not None else None, **options)
    refs = discover_runs(inputs)
    if not refs:
        raise LogError(
            problem(
                ", ".join(map(str, inputs)),
                "no run directories",
                "folders with timing/ or result.json, at any depth, or listed in study.json",
                "point the analysis at a study or run directory written by r2d2_hpc.train",
            )
        )
    loaded = load_runs(refs, opts.workers)
    report = build_report(inputs, opts, loaded)
    if write:
        report.write(opts.out or inputs[0] / "report")
    return report


def build_report(inputs: list[Path], opts: AnalysisOptions, loaded: list[RunLog]) -> Report:
    """Every table and plot from loaded runs (no file is written)."""
    notes: list[str] = []
    runs = add_series(pd.DataFrame([run_metrics.run_row(r, opts.warmup_steps) for r in loaded]))
    runs.insert(0, "series", runs.pop("series"))
    scaling, baseline_notes = scaling_table(runs, opts.baseline, opts.bootstrap_samples, opts.seed)
    notes += baseline_notes
    _add_targets(runs, loaded, scaling, opts.target_dice)
    models, model_notes = fit_models(runs)
    notes += model_notes
    curves, curve_notes = model_curves(scaling, models)
    notes += curve_notes
    report = Report(
        inputs=inputs,
        options=opts,
        runs=runs,
        scaling=scaling,
        fits=fit_table(models),
        curves=curves,
        breakdown=breakdown_table(runs),
        quality=quality_table(runs, scaling),
        dice=_dice_table(runs, loaded),
        ranks=_ranks_table(loaded),
        loss=_loss_table(runs, loaded),
        convergence=convergence_table(runs, loaded),
        notes=notes,
    )
    if opts.reference:
        report.references = load_references(opts.reference_dir)
    report.environment = environment_table(loaded)
    report.utilisation = utilisation_table(runs, loaded)
    report.stragglers = straggler_table(loaded)
    report.checks = honesty_checks(runs, loaded, scaling)
    if opts.plots:
        report.figures, report.vector_figures = draw_figures(report)
    return report


def _add_targets(
    runs: pd.DataFrame, loaded: list[RunLog], scaling: pd.DataFrame, target: float | None
) -> None:
    """Per series: the target Dice, then every run's time, steps and cost to reach it."""
    targets = {}
    bases = scaling.groupby("series")["baseline_world_size"].first().to_dict() if len(scaling) else {}
    for series, group in runs.groupby("series"):
        if target is not None:
            targets[series] = target
            continue
        done = group[(group["status"] == "completed") & group["final_dice"].notna()]
        at_base = done[done["world_size"] == bases.get(series)]
        pool = at_base if len(at_base) else done
        targets[series] = (
            DEFAULT_TARGET_FRACTION * float(pool["final_dice"].median()) if len(pool) else math.nan
        )
    runs["target_dice"] = runs["series"].map(targets)
    rows = []
    for run, t in zip(loaded, runs["target_dice"], strict=True):
        rows.append(
            run_metrics.time_to_target(run, t) if t == t else {"tta_s": math.nan, "tta_step": math.nan}
        )
    found = pd.DataFrame(rows, index=runs.index)
    runs["tta_s"] = found["tta_s"]
    runs["tta_step"] = found["tta_step"]
    runs["cost_to_target_hours"] = runs["tta_s"] * runs["cost_units"] / 3600


def _dice_table(runs: pd.DataFrame, loaded: list[RunLog]) -> pd.DataFrame:
    rows = []
    for row, run in zip(runs.itertuples(index=False), loaded, strict=True):
        figures = run_metrics.dice_figures(run)
        names = figures["class_names"]
        for i, value in enumerate(figures["dice_per_class"]):
            rows.append(
                {
                    "series": row.series,
                    "run_id": row.run_id,
                    "world_size": row.world_size,
                    "status": row.status,
                    "class": names[i] if i < len(names) else f"class {i}",
                    "dice": np.nan if value is None else float(value),
                }
            )
    return pd.DataFrame(rows, columns=["series", "run_id", "world_size", "status", "class", "dice"])


def _ranks_table(loaded: list[RunLog]) -> pd.DataFrame:
    frames = [r.ranks.assign(run_id=r.run_id) for r in loaded if len(r.ranks)]
    if not frames:
        return pd.DataFrame(columns=["run_id", "rank"])
    table = pd.concat(frames, ignore_index=True)
    return table[["run_id", *[c for c in table.columns if c != "run_id"]]]


def _loss_table(runs: pd.DataFrame, loaded: list[RunLog]) -> pd.DataFrame:
    frames = [
        run_metrics.loss_curve(run).assign(series=row.series, world_size=row.world_size, run_id=row.run_id)
        for row, run in zip(runs.itertuples(index=False), loaded, strict=True)
        if row.status not in ("unreadable", "missing") and len(run.steps)
    ]
    columns = ["series", "world_size", "run_id", "samples_seen", "loss"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def draw_figures(report: Report) -> tuple[dict[str, bytes], dict[str, dict[str, bytes]]]:
    """Every plot that has something to show: PNG bytes, and the same figure as SVG and PDF."""
    figures = {
        "speedup": plots.plot_speedup(report.scaling, report.curves, report.references),
        "efficiency": plots.plot_efficiency(report.scaling, report.curves, report.references),
        "throughput": plots.plot_throughput(report.scaling),
        "breakdown": plots.plot_breakdown(report.breakdown),
        "dice": plots.plot_dice(report.quality),
        "cost": plots.plot_cost(report.quality),
        "loss": plots.plot_loss(report.loss),
    }
    drawn = {name: fig for name, fig in figures.items() if fig is not None}
    vectors = {
        name: {fmt: plots.figure_bytes(fig, fmt) for fmt in FIGURE_FORMATS} for name, fig in drawn.items()
    }
    return {name: plots.png_bytes(fig) for name, fig in drawn.items()}, vectors
