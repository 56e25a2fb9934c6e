"""``python -m r2d2_hpc.train data.shards=<dir> model=unet run_dir=<dir> train.max_steps=<n>``: one rank.

Start one process per GPU (or per CPU rank) with ``torchrun --nproc_per_node=N -m r2d2_hpc.train ...`` or
``srun python -m r2d2_hpc.train ...``; the distributed environment is read from the variables they set. Any
setting of ``conf/train.yaml`` and the ``data/``, ``model/`` and ``train/`` groups is a Hydra override.
SIGUSR1 (``sbatch --signal=USR1@90``, before the time limit) and SIGTERM (a Slurm preemption, ``GraceTime`` before
SIGKILL) make every rank stop at the next step boundary; rank 0 checkpoints, ``result.json`` says ``preempted`` and
the process exits 0, so the batch script can requeue the job (``launcher=sbatch`` scripts do).
"""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from omegaconf import DictConfig

from r2d2_hpc.config import CONF_DIR, RunConfig, register_configs, to_dataclass
from r2d2_hpc.errors import R2D2Error

register_configs()
log = logging.getLogger("r2d2_hpc.train")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Builds the run config and the distributed environment, then trains this rank."""
    from r2d2_hpc.train.dist import dist_env_from_environ
    from r2d2_hpc.train.loop import StopFlag, train

    try:
        run_cfg = to_dataclass(RunConfig, cfg)
        env = dist_env_from_environ(backend=run_cfg.train.backend)
    except R2D2Error as exc:
        _setup_logging(0)
        log.error("%s", exc)
        sys.exit(2)
    _setup_logging(env.rank)
    stop = StopFlag()
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        result = train(run_cfg, env, stop)
    except R2D2Error as exc:
        log.error("%s", exc)
        sys.exit(1)
    if env.is_main:
        print(
            f"{result['status']}: {run_cfg.run_dir}/result.json "
            f"(throughput {result['throughput_samples_per_s'] or 0:.1f} samples/s, "
            f"Dice {[round(d, 4) for d in result['dice_per_class']]})"
        )


if __name__ == "__main__":
    main()
