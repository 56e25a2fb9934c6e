"""``python -m r2d2_hpc.analysis <study or run dirs...> [--out DIR] [--baseline ...] [--reference] ...``

Writes report.md, report.html (self-contained), scaling.csv and the other tables and plots to ``--out``
(default: ``report/`` in the first directory given). Exit status 0 on success, 2 on bad input (the message says
which file and how to fix it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from r2d2_hpc.analysis.options import DEFAULT_WARMUP_STEPS
from r2d2_hpc.analysis.report import analyse
from r2d2_hpc.errors import R2D2Error


def parser() -> argparse.ArgumentParser:
    """The command line; each flag is a field of :class:`~r2d2_hpc.analysis.options.AnalysisOptions`."""
    p = argparse.ArgumentParser(prog="python -m r2d2_hpc.analysis", description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="study directories, run directories, or both")
    p.add_argument("--out", type=Path, help="report folder (default: <first dir>/report)")
    p.add_argument(
        "--baseline",
        default="smallest",
        help="speedup reference: smallest (world size, default), single-node, or a world size such as 4",
    )
    p.add_argument("--reference", action="store_true", help="draw published figures beside the measured ones")
    p.add_argument(
        "--reference-dir", type=Path, help="folder of reference CSVs (default: analysis/reference)"
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        help=f"steps left out of timing after a start or resume (default: the run's own, else {DEFAULT_WARMUP_STEPS})",
    )
    p.add_argument(
        "--target-dice",
        type=float,
        help="mean foreground Dice for time-to-accuracy (default: 95%% of the baseline's median final Dice)",
    )
    p.add_argument("--workers", type=int, help="processes reading logs (default: one per CPU)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the analysis; returns the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start_s = time.perf_counter()
    try:
        report = analyse(
            args.dirs,
            out=args.out,
            baseline=args.baseline,
            reference=args.reference,
            reference_dir=args.reference_dir,
            warmup_steps=args.warmup_steps,
            target_dice=args.target_dice,
            workers=args.workers,
            plots=not args.no_plots,
        )
    except R2D2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = report.runs["status"].value_counts().to_dict()
    print(
        f"{len(report.runs)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())}) analysed in "
        f"{time.perf_counter() - start_s:.1f} s; report: {report.out / 'report.html'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
