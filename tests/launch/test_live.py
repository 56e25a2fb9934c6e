"""Live progress: run progress read from a real timing log, log lines every log_every_steps, the live table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from r2d2_hpc.launch.live import LiveTable, LocalProgress
from r2d2_hpc.launch.progress import RunProgress, run_progress


def _log(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _steps(first: int, last: int, step_s: float, samples: int = 8) -> list[dict]:
    return [
        {"type": "step", "step": s, "step_s": step_s, "samples": samples, "loss": 1.0 / s, "time": 1000.0 + s}
        for s in range(first, last + 1)
    ]


def test_progress_of_a_running_then_resumed_run(tmp_path: Path) -> None:
    log = tmp_path / "timing" / "rank0.jsonl"
    header = {"type": "header", "max_steps": 100, "host": "node7", "started_at": "2026-01-01T00:00:00+00:00"}
    _log(log, [header, *_steps(1, 40, 0.5)])
    prog = run_progress(tmp_path)
    assert (prog.step, prog.total, prog.host, prog.ended) == (40, 100, "node7", None)
    assert prog.loss == 1.0 / 40
    assert prog.samples_per_s == 8 / 0.5  # over the last RATE_WINDOW steps
    assert prog.eta_s == 60 * 0.5
    # a cut last line (a write in progress) is skipped; a resume restarts the rate window
    resumed = {"type": "header", "max_steps": 100, "resumed_at_step": 30}
    _log(log, [header, *_steps(1, 40, 0.5), resumed, *_steps(31, 35, 0.25)])
    with open(log, "a") as fh:
        fh.write('{"type": "step", "step": 36, "st')
    prog = run_progress(tmp_path)
    assert prog.step == 35 and prog.samples_per_s == 8 / 0.25 and prog.eta_s == 65 * 0.25
    with open(log, "a") as fh:
        fh.write('\n{"type": "end", "step": 35, "status": "preempted"}\n')
    prog = run_progress(tmp_path)
    assert prog.ended == "preempted" and prog.eta_s is None
    assert run_progress(tmp_path / "none") is None


def test_progress_reads_only_the_tail_of_a_long_log(tmp_path: Path) -> None:
    log = tmp_path / "timing" / "rank0.jsonl"
    early_eval = {"type": "eval", "step": 100, "dice_per_class": [0.9, 0.5, 0.7]}
    _log(
        log,
        [{"type": "header", "max_steps": 50000}, *_steps(1, 100, 0.1), early_eval, *_steps(101, 20000, 0.1)],
    )
    assert log.stat().st_size > 20 * 65536
    prog = run_progress(tmp_path)
    assert prog.step == 20000 and prog.total == 50000  # the total from the first line, the step from the tail
    assert prog.samples_per_s == pytest.approx(8 / 0.1)
    assert prog.dice is None  # the evaluation far from the end was not read
    with open(log, "a") as fh:
        fh.write(json.dumps(early_eval) + "\n")
    assert run_progress(tmp_path).dice == pytest.approx(0.6)


def test_log_lines_every_log_every_steps_without_a_terminal() -> None:
    out = io.StringIO()
    progress = LocalProgress(["a", "b"], {"a": 30, "b": 30}, log_every=10, out=out)
    progress.start("a")
    for step in (3, 9, 10, 14, 27, 30):  # polls see the steps the run has reached
        progress.update("a", RunProgress(step=step, total=30, loss=0.5, samples_per_s=4.0, eta_s=12.0))
    progress.finish("a", "COMPLETED")
    lines = out.getvalue().splitlines()
    steps = [line.split()[2] for line in lines if " step " in line]
    assert steps == ["10/30", "27/30", "30/30"]  # one line per multiple of 10 reached, and the last step
    assert "a: step 10/30 loss 0.5000 4.0 samples/s ETA 0:12" in lines
    assert lines[-1] == "a: COMPLETED; study: 1/2 runs done (1 COMPLETED)"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_table_redraws_in_place_on_a_terminal_and_prints_now_and_then_in_a_log() -> None:
    term = _Terminal()
    live = LiveTable(term)
    live.show("a\nb\nc", changed=True)
    live.show("a\nB\nc", changed=False)
    assert term.getvalue() == "a\nb\nc\n\x1b[3F\x1b[Ja\nB\nc\n"
    log = io.StringIO()
    live = LiveTable(log, print_every_s=3600)
    live.show("first", changed=False)
    live.show("same", changed=False)  # within the interval and nothing changed: not printed
    live.show("new", changed=True)
    text = log.getvalue()
    assert "first" in text and "same" not in text and "new" in text


def test_tqdm_lines_on_a_real_terminal() -> None:
    import os

    master, slave = os.openpty()  # a pseudo-terminal: isatty() is true, as for a user's shell
    with os.fdopen(slave, "w") as term:
        progress = LocalProgress(["a", "b"], {"a": 30, "b": 30}, log_every=10, out=term)
        progress.start("a")
        progress.update("a", RunProgress(step=12, total=30, loss=0.5, samples_per_s=4.0, eta_s=5.0))
        progress.finish("a", "COMPLETED")
        progress.close()
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal's other end is closed: all read
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "12/30" in text and "loss=0.5000" in text and "ETA=0:05" in text  # the run's bar
    assert "a: COMPLETED step 12/30 loss 0.5000" in text  # its line once it ended
    assert "study" in text and "1/2" in text and "1/2 runs done (1 COMPLETED)" in text  # the summary line
