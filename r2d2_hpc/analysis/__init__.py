"""Training logs in, scaling report out: speedup, efficiency, Karp-Flatt, a fitted step-time model with
projections, time breakdown, Dice against scale, time to accuracy and cost.

``python -m r2d2_hpc.analysis <study or run dirs...> --out <dir>`` or, from Python, ``analyse(dirs, out)``.
Only pandas, numpy, scipy and matplotlib are needed (no torch): logs copied to a laptop can be analysed there.
"""

from r2d2_hpc.analysis.jsonl import SUPPORTED_SCHEMAS, LogError, RankLog, read_rank_log
from r2d2_hpc.analysis.load import RunLog, RunRef, discover_runs, load_run, load_runs
from r2d2_hpc.analysis.model import StepTimeModel, fit_step_time_model
from r2d2_hpc.analysis.options import AnalysisOptions
from r2d2_hpc.analysis.reference import load_references
from r2d2_hpc.analysis.report import Report, analyse, build_report
from r2d2_hpc.analysis.scaling import bootstrap_ratio, karp_flatt, scaling_table

__all__ = [
    "SUPPORTED_SCHEMAS",
    "AnalysisOptions",
    "LogError",
    "RankLog",
    "Report",
    "RunLog",
    "RunRef",
    "StepTimeModel",
    "analyse",
    "bootstrap_ratio",
    "build_report",
    "discover_runs",
    "fit_step_time_model",
    "karp_flatt",
    "load_references",
    "load_run",
    "load_runs",
    "read_rank_log",
    "scaling_table",
]
