"""How far a run has got, read from rank 0's timing log (``timing/rank0.jsonl``) without reading all of it.

The first line (the header) gives the total steps; the last ~64 KiB give the latest steps (loss, samples/s over
the last :data:`RATE_WINDOW` steps, hence the ETA) and whether the rank has ended. A log being written is fine:
a cut last line is skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAIL_BYTES = 65536
RATE_WINDOW = 20  # steps over which samples/s and the ETA are measured


@dataclass
class RunProgress:
    """The latest state of one run's training, from its rank-0 timing log."""

    step: int = 0
    total: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    host: str | None = None
    started_at: str | None = None  # the first header's ISO time
    last_time: float | None = None  # unix time of the last step line
    ended: str | None = None  # the end line's status ("completed", "preempted"), None while running
    dice: float | None = None  # mean foreground Dice of the last evaluation

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_progress(run_dir: Path) -> RunProgress | None:
    """The progress of the run in ``run_dir``; None when it has no timing log yet."""
    path = Path(run_dir) / "timing" / "rank0.jsonl"
    try:
        with open(path, "rb") as fh:
            first = fh.readline()
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None
    header = _loads(first) or {}
    prog = RunProgress(
        total=header.get("max_steps"), host=header.get("host"), started_at=header.get("started_at")
    )
    steps: list[dict[str, Any]] = []
    for raw in tail.split(b"\n")[1 if size > TAIL_BYTES else 0 :]:  # the first piece may be cut
        record = _loads(raw)
        if record is None:
            continue
        kind = record.get("type")
        if kind == "step":
            steps.append(record)
            prog.ended = None
        elif kind == "end":
            prog.ended = record.get("status") or "ended"
        elif kind == "header":
            prog.ended = None
            steps = []  # a resumed run: rates restart with it
            prog.step = record.get("resumed_at_step") or prog.step
        elif kind == "eval":
            prog.dice = _mean_foreground(record.get("dice_per_class") or [])
    if steps:
        last = steps[-1]
        prog.step, prog.loss, prog.last_time = int(last["step"]), last.get("loss"), last.get("time")
        window = steps[-RATE_WINDOW:]
        step_s = sum(s.get("step_s") or 0.0 for s in window)
        if step_s > 0:
            prog.samples_per_s = sum(s.get("samples") or 0 for s in window) / step_s
            if prog.total is not None and prog.ended is None:
                prog.eta_s = max(0, prog.total - prog.step) * step_s / len(window)
    return prog


def _loads(raw: bytes) -> dict[str, Any] | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _mean_foreground(dice: list[Any]) -> float | None:
    values = [float(d) for d in dice[1:] if isinstance(d, int | float)]
    return sum(values) / len(values) if values else None


def predict_progress(out_dir: Path) -> RunProgress | None:
    """A launched prediction's progress: masks written so far out of the cases in ``predict.json``."""
    try:
        total = int(json.loads((Path(out_dir) / "predict.json").read_text())["num_cases"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    written = sum(1 for p in Path(out_dir).glob("*.nii.gz") if not p.name.endswith(".tmp.nii.gz"))
    return RunProgress(step=min(written, total), total=total)
