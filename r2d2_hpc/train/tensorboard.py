"""Optional TensorBoard event files of a run (``train.tensorboard=true``), written by rank 0 only.

Scalars: ``train/loss``, ``train/lr``, ``train/samples_per_s``, ``train/data_wait_share`` every step and
``val/dice/<class>``, ``val/mean_foreground_dice`` at every evaluation, in ``<run_dir>/tensorboard/``. TensorBoard
is no dependency of r2d2_hpc: asking for it without ``tensorboard`` installed fails at the start of the run, on
every rank, with the fix. A resumed run starts a new event file that drops what the old one had after the
checkpoint's step (``purge_step``), so the curves have no doubled stretch. Open them with
``tensorboard --logdir <study dir>/runs``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r2d2_hpc.errors import ConfigError

TB_DIR = "tensorboard"


def summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``; a ConfigError with the fix when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's module imports the tensorboard package
        raise ConfigError(
            f"train.tensorboard=true, but TensorBoard cannot be imported ({exc}); expected the tensorboard "
            "package. Fix: pip install tensorboard (or pip install 'r2d2_hpc[tensorboard]'), or "
            "train.tensorboard=false"
        ) from exc
    return SummaryWriter


class TensorBoardLog:
    """Rank 0's event writer; every method does nothing when it is off (other ranks, or not asked for)."""

    def __init__(
        self, run_dir: Path | None, enabled: bool, is_main: bool, resumed_at: int | None = None
    ) -> None:
        self._writer = None
        if not enabled:
            return
        writer_class = summary_writer_class()  # every rank checks, so a missing package fails them all
        if is_main and run_dir is not None:
            # the resumed run writes from step resumed_at + 1: what the old files hold from there on goes
            purge = None if resumed_at is None else resumed_at + 1
            self._writer = writer_class(log_dir=str(Path(run_dir) / TB_DIR), purge_step=purge)

    def step(
        self, step: int, loss: float, lr: float, samples: int, data_wait_s: float, step_s: float
    ) -> None:
        if self._writer is None:
            return
        self._scalar("train/loss", loss, step)
        self._scalar("train/lr", lr, step)
        if step_s > 0:
            self._scalar("train/samples_per_s", samples / step_s, step)
            self._scalar("train/data_wait_share", data_wait_s / step_s, step)

    def evaluation(self, step: int, dice: list[float], class_names: list[str] | None) -> None:
        if self._writer is None:
            return
        names = list(class_names or [])
        for i, value in enumerate(dice):
            self._scalar(f"val/dice/{names[i] if i < len(names) else i}", value, step)
        foreground = [d for d in dice[1:] if math.isfinite(d)]
        if foreground:
            self._scalar("val/mean_foreground_dice", sum(foreground) / len(foreground), step)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and math.isfinite(float(value)):
            self._writer.add_scalar(tag, float(value), step)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
