"""Resuming a multi-rank run: every rank from the same checkpoint at the same step, and the world-size rule.

Each rank choosing ``last.pt`` or ``prev.pt`` on its own is unsafe: one transient read error on a shared file
system makes that rank fall back to the older file, so the ranks resume at different steps with different
weights and the collectives then pair up wrongly. Here rank 0 chooses and validates the file
(:func:`~r2d2_hpc.train.checkpoint.load_checkpoint`), broadcasts its path and step on the CPU (gloo) group, every
other rank loads exactly that file, and all ranks compare what they loaded; any difference fails every rank
with one message that names the ranks and their problem.

A checkpoint written by another number of ranks is refused unless ``train.allow_world_size_change=true``. When
it is allowed, the restored optimizer and scheduler still carry the old peak learning rate (under weak scaling
with an LR rule, the peak follows the global batch): :func:`rescale_lr` moves them to this run's peak at the
same point of the schedule.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import torch.distributed as tdist

from r2d2_hpc.errors import problem
from r2d2_hpc.train.checkpoint import CheckpointError, TrainingParts, load_checkpoint
from r2d2_hpc.train.dist import DistEnv

log = logging.getLogger(__name__)


def load_agreed_checkpoint(
    target: Path, expected_hash: str | None, env: DistEnv, group: Any, map_location: Any = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """Every rank calls this; all return the same checkpoint (state, path), or all None, or all raise.

    Args:
        target: the checkpoint directory (``last.pt``, then ``prev.pt``) or an explicit file.
        expected_hash: the run's config hash (a foreign checkpoint is skipped or refused).
        env: this rank.
        group: the gloo group of :func:`~r2d2_hpc.train.dist.init_process_group` (None with one rank).
        map_location: where tensors are loaded.

    Raises:
        CheckpointError: rank 0 found checkpoints but none usable, or a rank could not load rank 0's choice.
    """
    state, choice = None, None
    if env.is_main:
        try:
            found = load_checkpoint(target, expected_hash, map_location)
        except CheckpointError as exc:
            choice = {"error": str(exc)}
        else:
            state, path = found if found is not None else (None, None)
            choice = {"path": str(path) if path else None, "step": int(state["step"]) if state else None}
    if env.world_size > 1:
        box = [choice]
        tdist.broadcast_object_list(box, src=0, group=group)
        choice = box[0]
    if "error" in choice:
        raise CheckpointError(
            choice["error"] if env.is_main else f"rank 0 chose no checkpoint: {choice['error']}"
        )
    if choice["path"] is None:
        return None
    path = Path(choice["path"])
    outcome: dict[str, Any] = {"rank": env.rank, "host": socket.gethostname()}
    if not env.is_main:
        try:
            state = load_checkpoint(path, expected_hash, map_location)[
                0
            ]  # exactly rank 0's file, no fallback
        except CheckpointError as exc:
            outcome["problem"] = str(exc)
    if state is not None:
        outcome["step"] = int(state["step"])
    outcomes = [outcome]
    if env.world_size > 1:
        outcomes = [None] * env.world_size
        tdist.all_gather_object(outcomes, outcome, group=group)
    _check_agreement(path, choice["step"], outcomes)
    return state, path


def _check_agreement(path: Path, step: int, outcomes: list[dict[str, Any]]) -> None:
    bad = [o for o in outcomes if "problem" in o or o.get("step") != step]
    if not bad:
        return
    lines = "\n".join(
        f"  - rank {o['rank']} on {o['host']}: "
        + (o["problem"] if "problem" in o else f"it holds step {o.get('step')}, not {step}")
        for o in bad
    )
    raise CheckpointError(
        f"{path}: rank 0 chose this checkpoint (step {step}), but {len(bad)} rank(s) could not resume from "
        f"the same file and step:\n{lines}\nEvery rank must resume from one file, or they would train "
        f"different weights from different steps. Fix: make sure {path.parent} is the same directory on every "
        "node (a shared file system) and readable; then resubmit (resume=auto retries the same choice), or "
        "point resume= at a file every rank can read"
    )


def check_world_size(state: dict[str, Any], path: Path, env: DistEnv, allowed: bool) -> bool:
    """True when the checkpoint was written by another number of ranks and that is allowed.

    Raises:
        CheckpointError: the number of ranks changed and ``train.allow_world_size_change`` is false.
    """
    saved = state.get("world_size")
    if saved == env.world_size:
        return False
    if not allowed:
        raise CheckpointError(
            problem(
                path,
                f"it was written by {saved} rank(s), this run has {env.world_size}",
                "the same number of ranks as the run that wrote it",
                f"resume with {saved} rank(s); or set train.allow_world_size_change=true to go on with "
                f"{env.world_size} (the LR schedule is moved to this run's peak; data order and the ranks' "
                "RNG streams restart from the step)",
            )
        )
    log.warning(
        "%s was written by %s rank(s), this run has %d (train.allow_world_size_change=true): the learning rate "
        "follows this run's peak from here; data order and RNG streams restart",
        path,
        saved,
        env.world_size,
    )
    return True


def rescale_lr(parts: TrainingParts, lr_peak: float) -> None:
    """Moves a restored optimizer and LambdaLR scheduler to peak ``lr_peak`` at the schedule's current step.

    ``load_state_dict`` brings back the peak of the run that wrote the checkpoint (``base_lrs``,
    ``initial_lr``, and the current ``lr``); the factor of the schedule at the current step is kept.
    """
    scheduler = parts.scheduler
    scheduler.base_lrs = [lr_peak] * len(parts.optimizer.param_groups)
    for group, factor in zip(parts.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr_peak
        group["lr"] = lr_peak * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in parts.optimizer.param_groups]  # what get_last_lr() reports
