"""What a launcher shows while it waits: the status table of a Slurm study, progress bars of a local one.

- :class:`LiveTable`: on a terminal the table is redrawn in place at every poll; in a log file it is printed when
  a run changes state, and otherwise every ``print_every_s`` (a few minutes).
- :class:`LocalProgress`: a local study runs one run at a time; on a terminal each run gets a tqdm line (step /
  total, loss, samples/s, ETA) under a summary line of the study; in a log file it prints one line every
  ``train.log_every_steps`` steps. Both read the running run's rank-0 timing log, so the training loop needs no
  knowledge of them.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from r2d2_hpc.launch.progress import RunProgress
from r2d2_hpc.launch.status import duration


class LiveTable:
    """Shows successive versions of a text table: in place on a terminal, now and then in a log."""

    def __init__(self, out: IO[str] | None = None, print_every_s: float = 300.0) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.print_every_s = print_every_s
        self._lines = 0
        self._printed_at = -float("inf")

    def show(self, text: str, changed: bool) -> None:
        """Draws ``text``; ``changed``: some run changed state since the last call (prints in a log too)."""
        if self.tty:
            # up to the first line of the last table, clear to the end of the screen, draw again
            prefix = f"\x1b[{self._lines}F\x1b[J" if self._lines else ""
            self.out.write(prefix + text + "\n")
            self._lines = text.count("\n") + 1
        elif changed or time.monotonic() - self._printed_at >= self.print_every_s:
            self.out.write(time.strftime("%Y-%m-%d %H:%M:%S ") + "study status\n" + text + "\n")
            self._printed_at = time.monotonic()
        self.out.flush()


class LocalProgress:
    """Progress of a local study's runs, one after the other (see the module doc)."""

    def __init__(self, names: list[str], totals: dict[str, int], log_every: int, out: IO[str] | None = None):
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.names, self.totals, self.log_every = names, totals, log_every  # 0: only the last step
        self.states: dict[str, str] = {}
        self._bar: Any = None
        self._summary: Any = None
        self._logged_step = 0
        self._last: RunProgress | None = None
        if self.tty:
            from tqdm import tqdm

            self._summary = tqdm(total=len(names), desc="study", unit="run", position=0, file=self.out)

    def start(self, name: str, state_before: str = "PLANNED") -> None:
        """``name`` starts (or resumes from a checkpoint)."""
        self._logged_step = 0
        self._last = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.totals.get(name), desc=name, unit="step", position=1, leave=False, file=self.out
            )
        else:
            self.out.write(f"{name}: started\n")
            self.out.flush()

    def update(self, name: str, prog: RunProgress | None) -> None:
        """Shows the latest progress of the running ``name``."""
        if prog is None or prog.total is None:
            return
        self._last = prog
        info = {
            "loss": f"{prog.loss:.4f}" if prog.loss is not None else "-",
            "samples/s": f"{prog.samples_per_s:.1f}" if prog.samples_per_s is not None else "-",
            "ETA": duration(prog.eta_s),
        }
        if self._bar is not None:
            self._bar.total = prog.total
            self._bar.n = prog.step
            self._bar.set_postfix(info, refresh=True)
            return
        every = self.log_every or prog.total
        if prog.step >= self._logged_step + every or (prog.step == prog.total > self._logged_step):
            # the latest multiple of log_every reached (a fast run may pass several between two polls)
            self._logged_step = prog.step - prog.step % every if prog.step < prog.total else prog.step
            self.out.write(
                f"{name}: step {prog.step}/{prog.total} loss {info['loss']} "
                f"{info['samples/s']} samples/s ETA {info['ETA']}\n"
            )
        self.out.flush()

    def finish(self, name: str, state: str) -> None:
        """``name`` ended in ``state``; the summary line counts it."""
        self.states[name] = state
        if self._bar is not None:
            from tqdm import tqdm

            self._bar.close()
            self._bar = None
            last = self._last
            steps = (
                f" step {last.step}/{last.total} loss {last.loss:.4f}"
                if last and last.loss is not None
                else ""
            )
            tqdm.write(f"{name}: {state}{steps}", file=self.out)
        if self._summary is not None:
            self._summary.update(1)
            self._summary.set_postfix_str(self.summary(), refresh=True)
        else:
            self.out.write(f"{name}: {state}; study: {self.summary()}\n")
            self.out.flush()

    def summary(self) -> str:
        done = len(self.states)
        counts: dict[str, int] = {}
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"{done}/{len(self.names)} runs done ({parts or 'none yet'})"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._summary is not None:
            self._summary.close()
