"""What report.md and report.html say, in order: settings, runs, scaling, model, time split, accuracy and cost,
references, per-run table and definitions. The tables shown are readable selections of the CSV files."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import pandas as pd

from r2d2_hpc.analysis.checks import environment_summary
from r2d2_hpc.analysis.model import MIN_SCALES
from r2d2_hpc.analysis.options import DEFAULT_TARGET_FRACTION, DEFAULT_WARMUP_STEPS
from r2d2_hpc.analysis.plots import MIN_REPEATS_FOR_SPREAD
from r2d2_hpc.analysis.render import Document, fmt

if TYPE_CHECKING:
    from r2d2_hpc.analysis.report import Report

MAX_RUN_ROWS = 60

DEFINITIONS = [
    "Throughput X: global samples per second over the measured steps, sum(samples) / sum(step time); a step's "
    "time is the mean over ranks. Warm-up steps after the start and after every resume are left out.",
    "Speedup S(N) = X(N) / X(N0) against the baseline scale N0. Strong scaling (fixed global batch, so the same "
    "steps per epoch): this equals T_epoch(N0) / T_epoch(N). Weak scaling (fixed batch per rank): this is the "
    "throughput per rank relative to N0, times N / N0.",
    "Efficiency E(N) = S(N) / (N / N0). Spreads: median over repeats with min-max (each repeat over the "
    "baseline's median) and a bootstrap 95% interval of the ratio of medians when both scales have 2+ repeats.",
    "Karp-Flatt serial fraction e = (1/S - 1/p) / (1 - 1/p), p = N / N0; it is defined for a fixed problem "
    "size, so under weak scaling read it as a trend only.",
    "Step-time model: T(N) = c * b(N) + t0 + 2 (N-1)/N * B / bandwidth + 2 (N-1) * latency (compute that "
    "divides by N, a constant per-step cost, a ring all-reduce of B gradient bytes; DDP overlaps it with the "
    "backward pass, so the bandwidth is an effective one), fitted by non-negative least squares to every run's "
    "mean step time, only with 3+ scales. The form (which terms) is chosen by leave-one-out error, as Extra-P "
    "does; the 95% prediction interval is the residuals' t interval, widened to at least the largest "
    "leave-one-out relative error. Dashed lines and hollow points are this model, not measurements.",
    "Time to target: wall-clock time from the start of the run (all segments of a resumed run) to the first "
    "evaluation whose mean foreground Dice reaches the target. Cost: Slurm elapsed time x GPUs (else CPUs) when "
    "slurm.json is present, else logged run time x ranks.",
]


def build_document(report: Report) -> Document:
    """The report as a :class:`Document`."""
    doc = Document("Scaling report", figures=report.figures)
    _settings(doc, report)
    _runs_summary(doc, report)
    _scaling(doc, report)
    _model(doc, report)
    _breakdown(doc, report)
    _trust(doc, report)
    _quality(doc, report)
    _references(doc, report)
    doc.heading("Per run")
    doc.table(
        _per_run(report.runs),
        MAX_RUN_ROWS,
        "All columns: runs.csv; per rank: ranks.csv; per class: dice.csv.",
    )
    doc.heading("Definitions")
    doc.items(DEFINITIONS)
    return doc


def _settings(doc: Document, report: Report) -> None:
    o = report.options
    warmup = (
        f"{o.warmup_steps} steps (set by the option)"
        if o.warmup_steps is not None
        else f"each run's train.timing_warmup_steps (default {DEFAULT_WARMUP_STEPS} when a run does not say)"
    )
    target = (
        f"{o.target_dice} mean foreground Dice"
        if o.target_dice is not None
        else f"{DEFAULT_TARGET_FRACTION:.0%} of the median final Dice at each series' baseline scale"
    )
    doc.items(
        [
            f"Inputs: {', '.join(str(p) for p in report.inputs)}",
            f"Generated: {datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"Warm-up left out of timing: {warmup}",
            f"Baseline: {o.baseline} (speedup and efficiency are relative to it, per series)",
            f"Target Dice: {target}",
        ]
    )


def _runs_summary(doc: Document, report: Report) -> None:
    runs = report.runs
    doc.heading("Runs")
    counts = runs["status"].value_counts()
    doc.paragraph(
        f"{len(runs)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + ". "
        "Completed, preempted and killed runs count for timing (their logged steps are real); only completed "
        "runs count for final Dice and cost to finish."
    )
    skipped = runs[~runs["timing_ok"]]
    doc.items([f"{r.run_id} ({r.status}): {r.why or 'no measured steps'}" for r in skipped.itertuples()])
    flagged = runs[runs["problems"].astype(bool)]
    doc.items([f"{r.run_id}: {r.problems}" for r in flagged.itertuples()])
    doc.items(report.notes)


def _scaling(doc: Document, report: Report) -> None:
    doc.heading("Scaling")
    table = report.scaling
    if table.empty:
        doc.paragraph("No run has measured steps, so there is nothing to scale.")
        return
    if not (table.groupby("series")["world_size"].nunique() > 1).any():
        doc.paragraph("Every series was run at a single scale: throughput and time split only, no speedup.")
    shown = pd.DataFrame(
        {
            "series": table["series"],
            "nodes": table["nodes"],
            "N": table["world_size"],
            "repeats": table["repeats"],
            "samples/s": table["throughput"],
            "samples/s min-max": _range(table["throughput_min"], table["throughput_max"]),
            "per rank": table["throughput_per_rank"],
            "step s (p50/p90)": [
                f"{fmt(a)} / {fmt(b)}"
                for a, b in zip(table["step_s_median"], table["step_s_p90"], strict=True)
            ],
            "speedup": table["speedup"],
            "speedup min-max": _range(table["speedup_min"], table["speedup_max"]),
            "speedup 95% CI": _range(table["speedup_ci_low"], table["speedup_ci_high"]),
            "efficiency": table["efficiency"],
            "Karp-Flatt": table["karp_flatt"],
            "N0": table["baseline_world_size"],
        }
    )
    doc.table(shown, note="scaling.csv holds these columns and more.")
    spread = _spread_caption(table)
    modelled = (
        "; dashed: fitted model; hollow: projection with its 95% prediction interval"
        if len(report.curves)
        else "; no model drawn (fewer than 3 scales)"
    )
    doc.figure("speedup", f"Speedup against ranks; {spread}; dotted: ideal{modelled}")
    doc.figure("efficiency", f"Scaling efficiency; {spread}{modelled}")
    doc.figure("throughput", f"Throughput in samples/s; {spread}")


def _spread_caption(table: pd.DataFrame) -> str:
    """What the bars are, honestly: min-max over 3+ repeats, or none."""
    enough = table["repeats"] >= MIN_REPEATS_FOR_SPREAD
    if enough.all():
        return "error bars: min-max over repeats"
    if enough.any():
        return f"error bars: min-max over repeats, only at points with {MIN_REPEATS_FOR_SPREAD}+ repeats"
    return f"no error bars (fewer than {MIN_REPEATS_FOR_SPREAD} repeats per point: single measurements)"


def _model(doc: Document, report: Report) -> None:
    doc.heading("Step-time model and projections")
    if report.fits.empty:
        doc.paragraph(
            f"No projection: no series has {MIN_SCALES} or more scales with known gradient size (with two, any "
            "two-term law fits exactly, so its projection would say nothing). Nothing is drawn."
        )
        return
    doc.paragraph(
        "T(N) = c * b(N) + t0 + 2 (N-1)/N * B / bandwidth + 2 (N-1) * latency; per series the form (which terms) "
        "is the one with the smallest leave-one-out error (one scale left out at a time, its median predicted)."
    )
    doc.table(report.fits.drop(columns=["candidates"]))
    doc.items(
        [
            f"{r.series}: candidate forms and their leave-one-out errors: {r.candidates}"
            for r in report.fits.itertuples()
        ]
    )
    proj = report.curves[report.curves["kind"] == "projection"]
    if len(proj):
        doc.paragraph(
            "PROJECTIONS (model, not measured) at 2x and 4x the largest measured world size, with the 95% "
            "prediction interval of the step time:"
        )
        shown = pd.DataFrame(
            {
                "series": proj["series"],
                "N (projected)": proj["world_size"],
                "form": proj["form"],
                "step s": proj["step_s"],
                "step s 95% PI": _range(proj["step_s_low"], proj["step_s_high"]),
                "speedup": proj["speedup"],
                "speedup 95% PI": _range(proj["speedup_low"], proj["speedup_high"]),
                "efficiency": proj["efficiency"],
            }
        )
        doc.table(shown)


def _breakdown(doc: Document, report: Report) -> None:
    doc.heading("Time breakdown (measured)")
    if report.breakdown.empty:
        doc.paragraph("No measured steps.")
        return
    doc.table(report.breakdown)
    b = report.breakdown
    unmeasured = b[~b["measured_comm"].astype(bool)]
    doc.paragraph(
        "Every part is measured on the ranks and they add up to the step time: data wait (the batch was not "
        "ready), compute (forward, backward, optimizer), exposed communication (all-reduce time after the last "
        "gradient bucket was ready, which the backward pass did not hide; comm_s is all the time an all-reduce "
        "was in flight) and other (step bookkeeping). The step-time model is not used here."
        + (
            f" {len(unmeasured)} point(s) come from logs without communication measurements: their "
            "communication is inside compute and other is the residual."
            if len(unmeasured)
            else ""
        )
    )
    doc.figure(
        "breakdown",
        f"Seconds per step, measured: data wait, compute, exposed communication, other; {_spread_caption(b)}",
    )


def _trust(doc: Document, report: Report) -> None:
    doc.heading("Honesty checks")
    if report.checks:
        doc.paragraph(f"{len(report.checks)} reason(s) to read the timings with care:")
        doc.items(report.checks)
    else:
        doc.paragraph(
            "None found: no oversubscribed CPUs, no overlapping runs on a host, no busy machine (load average, "
            f"CPU steal), {MIN_REPEATS_FOR_SPREAD}+ repeats everywhere, no speedup below 1."
        )
    doc.heading("Environment")
    doc.items(environment_summary(report.environment))
    if report.environment["commit"].nunique() > 1 if len(report.environment) else False:
        doc.paragraph("Runs come from different commits: per run in environment.csv.")
    doc.heading("Utilisation")
    if report.utilisation.empty:
        doc.paragraph("No run logged its FLOPs per sample: no FLOP/s or MFU.")
    else:
        doc.table(report.utilisation.drop(columns=["series"]), MAX_RUN_ROWS)
        doc.paragraph(
            "Achieved FLOP/s per device = 3 x forward FLOPs per sample x samples/s / ranks (forward plus a "
            "backward of about twice the forward); MFU = that / the device peak (a GPU's data-sheet dense peak, "
            "or on a CPU the fp32 matmul rate the rank measured at start-up)."
        )
    doc.heading("Stragglers")
    if report.stragglers.empty:
        doc.paragraph("No multi-rank run: no stragglers to look for.")
    else:
        doc.table(report.stragglers, MAX_RUN_ROWS)
        doc.paragraph(
            "spread = slowest rank's median step time / fastest rank's - 1. DDP makes ranks wait for each other, "
            "so the step times agree closely; a large spread points at the slowest rank's host."
        )


def _quality(doc: Document, report: Report) -> None:
    doc.heading("Accuracy, time to target and cost")
    q = report.quality
    if q.empty:
        return
    cols = [
        "series",
        "world_size",
        "runs",
        "completed",
        "dice",
        "dice_min",
        "dice_max",
        "dice_change",
        "target_dice",
        "reached_target",
        "tta_s",
        "cost_to_target_hours",
        "cost_hours",
        "cost_unit",
        "queue_wait_s",
    ]
    doc.table(q[[c for c in cols if c in q.columns]])
    doc.figure("dice", "Final mean foreground Dice against ranks: median over repeats, bars from min to max")
    _convergence(doc, report)
    doc.figure("cost", "Time to the target Dice; cost to the target and to the end of the run")
    doc.figure("loss", "Training loss against samples seen, by scale")


def _convergence(doc: Document, report: Report) -> None:
    c = report.convergence
    if c.empty:
        return
    doc.paragraph(
        "Did scaling change convergence? Mean foreground Dice at an equal number of samples seen (the series' "
        "common budget), mean over runs with a 95% interval; repeats train with different seeds. A change is "
        "called only when its 95% interval excludes zero, and only with at least 3 seeds per scale."
    )
    doc.table(c)


def _references(doc: Document, report: Report) -> None:
    refs = report.references
    if refs is None:
        return
    doc.heading("Published references")
    doc.paragraph(
        "Drawn in grey beside the measured curves. Different models, data and hardware: context, not a target."
    )
    cols = [
        "system",
        "model",
        "hardware",
        "precision",
        "num_gpus",
        "speedup",
        "efficiency",
        "source",
        "verified",
    ]
    doc.table(refs[cols])


def _per_run(runs: pd.DataFrame) -> pd.DataFrame:
    cols = [
        "run_id",
        "series",
        "status",
        "nodes",
        "world_size",
        "steps",
        "warmup_steps",
        "throughput",
        "step_s_median",
        "step_s_p90",
        "data_wait_share",
        "epoch_time_s",
        "peak_memory_gib",
        "final_dice",
        "tta_s",
        "queue_wait_s",
        "cost_hours",
        "cost_unit",
    ]
    return runs[[c for c in cols if c in runs.columns]]


def _range(lo: pd.Series, hi: pd.Series) -> list[str]:
    return [f"{fmt(a)}-{fmt(b)}" if a == a and b == b else "" for a, b in zip(lo, hi, strict=True)]
