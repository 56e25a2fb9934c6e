"""The launch stage: plan a study, run or submit its jobs, follow them, collect their accounting.

``python -m r2d2_hpc.launch`` is the Hydra app (:mod:`r2d2_hpc.launch.app`). The parts: :mod:`.plan` (models x
scales x repeats and each run's config), :mod:`.executors` (local processes, submitit on Slurm), :mod:`.job`
(the callable every rank runs), :mod:`.record` (``study.json``), :mod:`.accounting` (``sacct``) and
:mod:`.sbatch` (sbatch scripts for ``launcher=sbatch``).
"""
