"""The settings of one analysis (the CLI flags and the keyword arguments of ``analyse`` map onto these)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r2d2_hpc.errors import ConfigError, problem

DEFAULT_WARMUP_STEPS = 5  # used when neither the option nor the run's train.timing_warmup_steps says
DEFAULT_TARGET_FRACTION = 0.95  # default target Dice: this share of the baseline scale's median final Dice
BASELINE_MODES = ("smallest", "single-node")


@dataclass
class AnalysisOptions:
    """How to analyse a study; every field has a default that the report states."""

    out: Path | None = None  # report folder; None: <first directory given>/report
    baseline: str = "smallest"  # smallest (world size) | single-node (most ranks on one node) | a world size
    reference: bool = False  # draw published figures (analysis/reference/*.csv) beside the measured ones
    reference_dir: Path | None = None  # where those CSVs are; None: the checkout's analysis/reference
    warmup_steps: int | None = None  # steps left out after a start or resume; None: the run's own setting
    target_dice: float | None = None  # mean foreground Dice to reach; None: a share of the baseline's Dice
    workers: int | None = None  # processes reading logs; None: one per CPU
    bootstrap_samples: int = 2000  # resamples of the speedup interval over repeats (0: none)
    seed: int = 0  # of the bootstrap
    plots: bool = True  # draw PNG plots (off: tables only, faster)

    def __post_init__(self) -> None:
        if self.out is not None:
            self.out = Path(self.out)
        if self.reference_dir is not None:
            self.reference_dir = Path(self.reference_dir)
        self.baseline = str(self.baseline)
        if self.baseline not in BASELINE_MODES and not (self.baseline.isdigit() and int(self.baseline) > 0):
            raise ConfigError(
                problem(
                    None,
                    f"baseline={self.baseline!r}",
                    f"one of {', '.join(BASELINE_MODES)} or a world size such as 4",
                    "pass --baseline smallest (the default), --baseline single-node or --baseline <ranks>",
                )
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(
                problem(None, f"warmup_steps={self.warmup_steps}", "0 or more", "fix --warmup-steps")
            )
        if self.target_dice is not None and not 0.0 < self.target_dice <= 1.0:
            raise ConfigError(
                problem(None, f"target_dice={self.target_dice}", "a Dice in (0, 1]", "fix --target-dice")
            )
        if self.bootstrap_samples < 0:
            raise ConfigError(problem(None, f"bootstrap_samples={self.bootstrap_samples}", ">= 0", "fix it"))
