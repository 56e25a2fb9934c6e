"""``python -m r2d2_hpc.study <verb> <study dir> ...``

- ``status [--json]``: one row per run (model, scale nodes x ranks, repeat, state with Slurm's pending reason, job,
  nodes, elapsed, step / total, last loss, samples/s, ETA) and a summary line. Exit status 0 when nothing failed,
  1 when some run FAILED (or TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, LOST), 2 on bad input.
- ``logs [run] [-f] [--rank R]``: the run's stdout and stderr (every rank, or rank R), followed with ``-f``.
- ``cancel [run ...]``: cancels the runs' jobs (all runs when none is named) and marks them CANCELLED.
- ``resume [run ...] [--no-wait]``: starts the runs that did not complete again, from their checkpoints.
- ``report [analysis options]``: the study's report, as ``python -m r2d2_hpc.analysis <study dir>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from r2d2_hpc.errors import R2D2Error
from r2d2_hpc.launch.record import Study


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m r2d2_hpc.study", description=__doc__.split("\n")[0].strip("`")
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="verb")
    status = verbs.add_parser("status", help="the state of every run")
    status.add_argument("dir", type=Path, help="study directory (holds study.json)")
    status.add_argument("--json", action="store_true", help="one JSON document for scripts")
    logs = verbs.add_parser("logs", help="a run's stdout/stderr")
    logs.add_argument("dir", type=Path)
    logs.add_argument("run", nargs="?", help="run name (default: every run)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what is added until it ends")
    logs.add_argument("--rank", type=int, help="only this rank's output")
    cancel = verbs.add_parser("cancel", help="cancel runs (all when none is named)")
    cancel.add_argument("dir", type=Path)
    cancel.add_argument("runs", nargs="*")
    resume = verbs.add_parser("resume", help="start the runs that did not complete again, from checkpoints")
    resume.add_argument("dir", type=Path)
    resume.add_argument("runs", nargs="*")
    resume.add_argument("--no-wait", action="store_true", help="Slurm: submit and return")
    resume.add_argument("--no-report", action="store_true", help="no report at the end")
    report = verbs.add_parser("report", help="the analysis (python -m r2d2_hpc.analysis <dir>)")
    report.add_argument("dir", type=Path)
    report.add_argument("options", nargs=argparse.REMAINDER, help="any python -m r2d2_hpc.analysis option")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.verb == "report":
        from r2d2_hpc.analysis.__main__ import main as analysis_main

        return analysis_main([str(args.dir), *args.options])
    try:
        study = Study.load(args.dir.absolute())
        return VERBS[args.verb](study, args)
    except (R2D2Error, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _status(study: Study, args: argparse.Namespace) -> int:
    from r2d2_hpc.launch.status import as_json, study_status, table

    rows = study_status(study)
    if args.json:
        print(json.dumps(as_json(study, rows), indent=1))
    else:
        print(f"study {study.dir} ({study.meta.get('launcher')})")
        print(table(rows))
    return 1 if any(r.failed for r in rows) else 0


def _logs(study: Study, args: argparse.Namespace) -> int:
    from r2d2_hpc.launch.logs import print_logs

    runs = [study.run(args.run)] if args.run else list(study.runs)
    found = print_logs(
        study, runs, sys.stdout, rank=args.rank, follow=_until_ended(study, runs) if args.follow else None
    )
    if not found and not args.follow:
        print(f"no log files yet for {', '.join(r.name for r in runs)} (not started?)", file=sys.stderr)
    return 0


def _until_ended(study: Study, runs: list) -> Callable[[], bool]:
    """True while some of ``runs`` has not ended; asks the scheduler at backed-off intervals only."""
    from r2d2_hpc.launch.scheduler import Backoff, SlurmQueue
    from r2d2_hpc.launch.status import study_status

    queue, backoff, names = SlurmQueue(), Backoff(first_s=2.0, max_s=30.0), {r.name for r in runs}
    state = {"next_check": 0.0, "going": True}

    def going() -> bool:
        if time.monotonic() >= state["next_check"]:
            rows = [r for r in study_status(Study.load(study.dir), queue) if r.name in names]
            state["going"] = not all(r.done for r in rows)
            state["next_check"] = time.monotonic() + backoff.next(False)
        return bool(state["going"])

    return going


def _cancel(study: Study, args: argparse.Namespace) -> int:
    from r2d2_hpc.launch.control import cancel

    names = cancel(study, args.runs or None)
    print(f"cancelled {len(names)} run(s): {', '.join(names) or 'none was still going'}")
    return 0


def _resume(study: Study, args: argparse.Namespace) -> int:
    from r2d2_hpc.config import LaunchConfig, to_dataclass
    from r2d2_hpc.launch.control import resume
    from r2d2_hpc.launch.finish import finish_study

    launcher = study.meta.get("launcher")
    runs = resume(study, args.runs or None)
    if not runs:
        print("nothing to resume: every run completed or is still going")
        return 0
    print(f"resumed {len(runs)} run(s): {', '.join(r.name for r in runs)}")
    if launcher in ("slurm",) and not args.no_wait:
        from r2d2_hpc.launch.accounting import store_accounting
        from r2d2_hpc.launch.follow import follow

        follow(study)
        store_accounting(study)
    elif launcher in ("slurm", "sbatch"):
        print(f"follow them with: python -m r2d2_hpc.study status {study.dir}")
        return 0
    lc = to_dataclass(LaunchConfig, study.meta["config"])
    finish_study(study, lc.study.report and not args.no_report)
    return 1 if any(r.state != "COMPLETED" for r in study.runs) else 0


VERBS = {"status": _status, "logs": _logs, "cancel": _cancel, "resume": _resume}
