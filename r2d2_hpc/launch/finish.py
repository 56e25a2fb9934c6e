"""The end of a study: its run table, its report, and the few numbers printed beside the report's path (speedup
and efficiency at the largest scale of each series, the best final Dice)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r2d2_hpc.launch.record import Study


def finish_study(study: Study, report: bool) -> Path:
    """Prints the runs' states; with ``report`` writes ``<study>/report`` and prints its path and headline."""
    print(study.summary())
    if report:
        from r2d2_hpc.analysis import analyse

        result = analyse([study.dir], out=study.dir / "report")
        print(f"report: {study.dir / 'report' / 'report.html'} (and report.md)")
        for line in headline(result):
            print(f"  {line}")
    return study.dir


def headline(report: Any) -> list[str]:
    """``unet (strong, batch 16): 2 ranks: speedup 1.62, efficiency 81%`` per series, then the best Dice."""
    lines = []
    scaling = report.scaling
    if len(scaling) and "series" in scaling:
        for series, group in scaling.groupby("series", sort=True):
            if group["world_size"].nunique() < 2:
                continue
            top = group.sort_values(["world_size", "nodes"]).iloc[-1]
            nodes = top.get("nodes")
            where = f"{int(top['world_size'])} ranks" + (
                f" on {int(nodes)} node(s)" if nodes is not None and not _nan(nodes) else ""
            )
            lines.append(
                f"{series}: {where}: speedup {top['speedup']:.2f}, efficiency {top['efficiency']:.0%} "
                f"(vs {int(top['baseline_world_size'])} rank(s))"
            )
    runs = report.runs
    if len(runs) and "final_dice" in runs:
        dice = runs.dropna(subset=["final_dice"])
        if len(dice):
            best = dice.loc[dice["final_dice"].idxmax()]
            lines.append(f"best mean foreground Dice {best['final_dice']:.4f} ({best['run_id']})")
    return lines or ["no run finished with timings or Dice: nothing to sum up"]


def _nan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True
