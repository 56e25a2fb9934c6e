"""Training stage: distributed set-up, the loop, losses, metrics, schedules, checkpoints and timing logs.

Nothing in this package imports Slurm, submitit or Hydra; ``python -m r2d2_hpc.train`` (``__main__``) is the only
place that composes a Hydra config, and it hands the loop a plain ``RunConfig`` and a ``DistEnv``.
"""
