"""The submitit callable of one training run: every rank of a job runs ``TrainJob()``.

The launcher owns the cluster; the training loop knows nothing of it. ``TrainJob`` turns the job's environment
into a ``DistEnv``, trains this rank, and handles preemption and time-outs the safe way:

- Slurm sends submitit's signal (``USR2`` by default) ``signal_delay_s`` before the time limit, and SIGTERM to every
  task when a job of a higher-priority partition preempts this one (``PreemptMode=REQUEUE``: SIGKILL follows after
  the partition's ``GraceTime``; submitit itself ignores SIGTERM, so the work since the last periodic checkpoint
  would be lost). Our handler, installed over submitit's for both, only sets a flag: every rank stops at the next
  step boundary (they agree through an all-reduce), rank 0 writes the checkpoint, and then rank 0 requeues the job
  itself (``scontrol requeue``, within GraceTime: a job that ends by itself would count as COMPLETED), at most
  ``max_requeues`` times (counted in the run directory). The requeued job runs the same callable, and ``resume=auto`` continues from that checkpoint with the
  same step, learning rate and data order.
- Checkpointing from inside submitit's own handler (its ``checkpoint()`` hook) would interrupt a step half-way and
  could not gather the other ranks' RNG states, so ``checkpoint()`` is only a fallback that resubmits the job as it
  is (it resumes from the last periodic checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from r2d2_hpc.config import RunConfig

log = logging.getLogger(__name__)
REQUEUE_FILE = "requeues.json"


class TrainJob:
    """One run of a study, as submitit (or the local launcher) calls it on every rank."""

    def __init__(self, run_cfg: RunConfig, max_requeues: int = 3, master_port: int | None = None) -> None:
        self.run_cfg = run_cfg
        self.max_requeues = max_requeues
        self.master_port = master_port  # local launcher only: a free port chosen by the launcher

    def __call__(self) -> dict[str, Any]:
        # Catch the stop signals first: importing torch takes seconds, and a signal meanwhile would otherwise
        # reach submitit's handler (resubmit from the last checkpoint) or end the task.
        early = threading.Event()
        for sig in _preemption_signals():
            signal.signal(sig, lambda *_: early.set())
        from r2d2_hpc.train.dist import dist_env_from_environ
        from r2d2_hpc.train.loop import StopFlag, train

        if self.master_port is not None and "SLURM_JOB_ID" not in os.environ:
            os.environ["MASTER_PORT"] = str(self.master_port)
        env = dist_env_from_environ(backend=self.run_cfg.train.backend)
        logging.basicConfig(
            level=logging.INFO if env.rank == 0 else logging.WARNING,
            force=True,
            format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
        )
        stop = StopFlag()
        for sig in _preemption_signals():
            signal.signal(sig, lambda *_: stop.set())
        if early.is_set():
            stop.set()
        result = train(self.run_cfg, env, stop)
        if result["status"] != "preempted":
            return result
        if "SLURM_JOB_ID" not in os.environ or not self._may_requeue():
            return result  # the run stays resumable with resume=auto
        if env.rank == 0:
            self._requeue()
        else:
            time.sleep(120)  # scontrol requeue ends this task; never exit first and look like a failed rank
        # Like submitit after a requeue: leave without a result, the requeued job writes it.
        sys.exit(-1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's fallback hook: resubmit unchanged; ``resume=auto`` picks up the last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            TrainJob(replace(self.run_cfg, resume="auto"), self.max_requeues, self.master_port)
        )

    def _requeues_done(self) -> int:
        path = Path(self.run_cfg.run_dir) / REQUEUE_FILE
        return json.loads(path.read_text())["count"] if path.is_file() else 0

    def _may_requeue(self) -> bool:
        count = self._requeues_done()
        if count >= self.max_requeues:
            log.error(
                "preempted or timed out %d times (launcher.max_requeues=%d): not requeued again; the run "
                "can be resumed with resume=auto",
                count + 1,
                self.max_requeues,
            )
            return False
        return True

    def _requeue(self) -> None:
        path = Path(self.run_cfg.run_dir) / REQUEUE_FILE
        count = self._requeues_done()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"count": count + 1}))
        os.replace(tmp, path)
        job_id = _slurm_job_id()
        log.warning("requeueing Slurm job %s (%d/%d)", job_id, count + 1, self.max_requeues)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def _slurm_job_id() -> str:
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_id}_{task_id}" if array_id and task_id else os.environ["SLURM_JOB_ID"]


def _preemption_signals() -> list[signal.Signals]:
    """submitit's time-limit signal (SUBMITIT_PREEMPT_SIGNAL, default USR2), USR1 (our sbatch scripts) and SIGTERM
    (Slurm's preemption signal)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    found = {getattr(signal, f"SIG{name}", signal.SIGUSR2), signal.SIGUSR1, signal.SIGTERM}
    return sorted(found)
