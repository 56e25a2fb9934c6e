"""What Slurm says about a study's jobs: one ``squeue`` and at most one ``sacct`` call per poll, for any number.

Per-job polling (``sacct -j <one id>`` per job and cycle) hits the controller's RPC limits on a busy cluster, so
:meth:`SlurmQueue.poll` asks ``squeue`` once about every job still in the queue (state, pending reason, nodes,
elapsed), and ``sacct`` once about the jobs that have left it (final state, nodes, elapsed, exit code). A cluster
without accounting (``sacct`` answers "accounting storage is disabled", or is missing) is reported once; from then
on only ``squeue`` is asked and a job that left the queue is judged by its files (see :mod:`.status`).
:class:`Backoff` spaces the polls: short at first, then longer while nothing changes.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

log = logging.getLogger("r2d2_hpc.launch")

SQUEUE_FIELDS = (
    "%i",
    "%T",
    "%r",
    "%N",
    "%M",
)  # job id (array tasks as 123_4), state, reason, nodes, time used
SACCT_FIELDS = ("JobID", "State", "Reason", "NodeList", "ElapsedRaw", "ExitCode")
ACCOUNTING_OFF = ("accounting storage is disabled", "slurm_persist_conn_open", "no such file")


@dataclass
class JobInfo:
    """One job as the scheduler sees it now."""

    job_id: str
    state: str  # Slurm's state word: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, REQUEUED, ...
    reason: str | None = None  # why a pending job waits (Priority, Resources, BeginTime, ...)
    nodes: str | None = None  # node list
    elapsed_s: float | None = None
    exit_code: str | None = None
    in_queue: bool = True  # from squeue (False: from sacct, the job has left the queue)


class SlurmQueue:
    """Polls Slurm about many jobs with one ``squeue`` and at most one ``sacct`` call per :meth:`poll`."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.accounting = True  # False once sacct said there is no accounting
        self.calls = {"squeue": 0, "sacct": 0}
        self.answered = True  # False when the last poll's squeue failed (controller down): nothing is known

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """What Slurm knows of ``job_ids``; a job neither command knows is missing from the answer."""
        ids = sorted({j for j in job_ids if j})
        if not ids:
            return {}
        found = self._squeue(ids)
        if not self.answered:
            return {}  # without squeue a job missing from sacct cannot be told from one still queued
        gone = [j for j in ids if j not in found]
        if gone and self.accounting:
            found.update(self._sacct(gone))
        return found

    def _run(self, name: str, args: list[str]) -> subprocess.CompletedProcess | None:
        self.calls[name] += 1
        try:
            return subprocess.run(
                [name, *args], capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return subprocess.CompletedProcess([name], 127, "", str(exc))

    def _squeue(self, ids: list[str]) -> dict[str, JobInfo]:
        # -r: one line per array task, also while the array is pending (else "123_[0-4]")
        done = self._run("squeue", ["-h", "-r", "-j", ",".join(ids), "-o", "|".join(SQUEUE_FIELDS)])
        self.answered = True
        if done is None or done.returncode != 0:
            # "Invalid job id specified": none of them is in the queue any more
            if done is None or "invalid job id" not in done.stderr.lower():
                self.answered = False
                log.warning(
                    "squeue failed (%s); job states may be stale", done.stderr.strip()[:200] if done else ""
                )
            return {}
        wanted, found = set(ids), {}
        for line in done.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) != len(SQUEUE_FIELDS):
                continue
            job_id, state, reason, nodes, used = parts
            key = job_id
            if key not in wanted:
                continue
            found[key] = JobInfo(
                key,
                state.split()[0],
                reason if reason and reason != "None" else None,
                nodes or None,
                _duration_s(used),
            )
        return found

    def _sacct(self, ids: list[str]) -> dict[str, JobInfo]:
        done = self._run("sacct", ["-X", "-n", "-P", "-j", ",".join(ids), "-o", ",".join(SACCT_FIELDS)])
        if done is None or done.returncode != 0:
            text = (done.stderr if done is not None else "").strip()
            if any(k in text.lower() for k in ACCOUNTING_OFF) or (
                done is not None and done.returncode == 127
            ):
                self.accounting = False
                log.warning(
                    "Slurm accounting is off (sacct: %s); states come from squeue and the run files",
                    text.splitlines()[-1][:200] if text else "not found",
                )
            else:
                log.warning("sacct failed (%s); job states may be stale", text[:200])
            return {}
        wanted, found = set(ids), {}
        for line in done.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) != len(SACCT_FIELDS):
                continue
            job_id, state, reason, nodes, elapsed, exit_code = parts
            key = job_id
            if key not in wanted:
                continue
            found[key] = JobInfo(
                key,
                state.split()[0] if state else "UNKNOWN",  # "CANCELLED by 0" -> CANCELLED
                reason if reason and reason != "None" else None,
                nodes if nodes and nodes != "None assigned" else None,
                float(elapsed) if elapsed.isdigit() else None,
                exit_code or None,
                in_queue=False,
            )
        return found


def _duration_s(text: str) -> float | None:
    """Seconds of Slurm's ``[D-][HH:]MM:SS`` (squeue %M); None for an empty or unknown value."""
    text = text.strip()
    if not text or text in ("INVALID", "N/A"):
        return None
    days, _, hms = text.rpartition("-")
    try:
        parts = [int(p) for p in hms.split(":")]
    except ValueError:
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return float(int(days or 0) * 86400 + seconds)


class Backoff:
    """Poll intervals: ``first_s``, growing by ``factor`` up to ``max_s`` while nothing changes."""

    def __init__(self, first_s: float = 2.0, max_s: float = 60.0, factor: float = 1.5) -> None:
        self.first_s, self.max_s, self.factor = first_s, max_s, factor
        self.current_s = first_s

    def next(self, changed: bool) -> float:
        """The wait before the next poll; a change resets it to ``first_s``."""
        self.current_s = self.first_s if changed else min(self.max_s, self.current_s * self.factor)
        return self.current_s
