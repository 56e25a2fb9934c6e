"""Waiting for a Slurm study: poll all its jobs at once, record their states, show the table.

Each cycle is one :func:`~.status.study_status` call (one ``squeue``, at most one ``sacct``, whatever the number
of jobs); the wait between cycles backs off while nothing changes (:class:`~.scheduler.Backoff`). State changes
go to ``study.json`` as they are seen, so ``python -m r2d2_hpc.study status`` and a later attach agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from r2d2_hpc.launch.live import LiveTable
from r2d2_hpc.launch.record import Study
from r2d2_hpc.launch.scheduler import Backoff, SlurmQueue
from r2d2_hpc.launch.status import RunStatus, study_status, table


def record_states(study: Study, rows: list[RunStatus]) -> bool:
    """Writes the rows' states (and errors) into study.json; True when any run changed."""
    changed = False
    for run, row in zip(study.runs, rows, strict=True):
        if row.state != run.state:
            run.state, changed = row.state, True
            if row.error or (row.failed and row.reason):
                run.error = row.error or row.reason
    if changed:
        study.save()
    return changed


def follow(
    study: Study,
    queue: SlurmQueue | None = None,
    backoff: Backoff | None = None,
    live: LiveTable | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[RunStatus]:
    """Polls until every run has ended; returns the last status rows."""
    queue = queue or SlurmQueue()
    backoff = backoff or Backoff()
    live = live or LiveTable()
    while True:
        rows = study_status(study, queue)
        changed = record_states(study, rows)
        live.show(table(rows), changed)
        if all(r.done for r in rows):
            return rows
        sleep(backoff.next(changed))
