"""``python -m r2d2_hpc.predict checkpoint=<file> input=<path> out=<dir> [labels=<path>]``: segment NIfTI volumes.

Writes ``<out>/<case>.nii.gz`` per input case on the input's own grid (shape, affine, orientation), plus
``predict.json``; with ``labels=`` also ``metrics.csv`` and ``metrics_summary.csv``. Start one process per GPU with
``torchrun --nproc_per_node=N -m r2d2_hpc.predict ...`` or ``srun python -m r2d2_hpc.predict ...`` to split the
cases; settings: ``conf/predict.yaml`` and ``r2d2_hpc/inference/config.py``. Exit status: 0 when every case was
written, 1 when some case failed (the others are still written), 2 on a bad setting.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from r2d2_hpc.config import CONF_DIR, to_dataclass
from r2d2_hpc.config import register_configs as register_launch_configs
from r2d2_hpc.errors import R2D2Error
from r2d2_hpc.inference.config import PredictConfig, register_configs

register_configs()
register_launch_configs()  # the launcher/ group, for launcher=local|slurm
log = logging.getLogger("r2d2_hpc.predict")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [part {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Checks the settings, predicts this process' share of the cases, prints the metric table."""
    from r2d2_hpc.inference.runner import run_predict

    _setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    try:
        predict_cfg = to_dataclass(PredictConfig, cfg)
    except R2D2Error as exc:
        log.error("%s", exc)
        sys.exit(2)
    if predict_cfg.launcher:
        sys.exit(_launched(predict_cfg))
    try:
        run = run_predict(predict_cfg)
    except R2D2Error as exc:
        log.error("%s", exc)
        sys.exit(1)
    print(f"part {run.part} of {run.num_parts}: wrote {len(run.written)} mask(s) to {predict_cfg.out}")
    if run.table:
        print(run.table)
        print(f"per case: {run.metrics_csv}")
    failures = run.all_failures if run.all_failures is not None else run.failures
    if failures:
        print(f"{len(failures)} case(s) failed (see {predict_cfg.out}/failures.json):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure['case_id']}: {failure['error']}", file=sys.stderr)
    if run.failures:
        sys.exit(1)


def _launched(predict_cfg: PredictConfig) -> int:
    """launcher=local|slurm: the prediction as a job (r2d2_hpc.launch.predict_job); exit 1 unless it completed."""
    from r2d2_hpc.launch.predict_job import launch_predict

    try:
        study = launch_predict(predict_cfg)
    except R2D2Error as exc:
        log.error("%s", exc)
        return 2
    run = study.runs[0]
    print(f"predict job {run.job_id}: {run.state}" + (f"\n{run.error}" if run.error else ""))
    return 0 if run.state in ("COMPLETED", "SUBMITTED", "PENDING", "RUNNING") else 1


if __name__ == "__main__":
    main()
