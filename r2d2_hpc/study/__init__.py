"""``python -m r2d2_hpc.study <verb> <study dir>``: follow and steer a study (status, logs, cancel, resume, report).

The verbs live in :mod:`r2d2_hpc.study.cli`; the work in :mod:`r2d2_hpc.launch` (status, logs, control).
"""
