"""``python -m r2d2_hpc.evaluate pred=<dir> ref=<dir> out=<file.csv>``: metrics of predicted masks.

Per case and class: Dice, IoU, HD95, ASSD (mm) and surface Dice; ``out`` gets one row per case and class and
``<stem>_summary.csv`` the mean, median, std and pooled values per class (see ``r2d2_hpc/inference/metrics.py``
for the definitions and the conventions for empty masks). Exit status: 0 when every case was scored, 1 when some
could not be (the others are still in the tables), 2 on a bad setting.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from r2d2_hpc.config import CONF_DIR, to_dataclass
from r2d2_hpc.errors import R2D2Error
from r2d2_hpc.inference.config import EvaluateConfig, register_configs

register_configs()
log = logging.getLogger("r2d2_hpc.evaluate")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Checks the settings, scores every mask, prints the summary table."""
    from r2d2_hpc.inference.evaluation import run_evaluate

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        evaluate_cfg = to_dataclass(EvaluateConfig, cfg)
    except R2D2Error as exc:
        log.error("%s", exc)
        sys.exit(2)
    try:
        run = run_evaluate(evaluate_cfg)
    except R2D2Error as exc:
        log.error("%s", exc)
        sys.exit(1)
    print(run.table)
    print(f"per case: {run.per_case_csv}\nsummary: {run.summary_csv}")
    if run.failures:
        print(f"{len(run.failures)} case(s) could not be scored:", file=sys.stderr)
        for failure in run.failures:
            print(f"  {failure['case_id']}: {failure['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
