"""Packaging: the checkout's ``conf/`` and ``analysis/reference/`` are the one source of the configs and the
reference figures; the wheel carries them as ``r2d2_hpc/conf`` and ``r2d2_hpc/analysis/reference_csv`` (mapped
here with ``package_dir``, so nothing is copied in the checkout). Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {"r2d2_hpc.conf": "conf", "r2d2_hpc.analysis.reference_csv": "analysis/reference"}

setup(
    packages=[*find_packages(include=["r2d2_hpc", "r2d2_hpc.*"]), *DATA_PACKAGES],
    package_dir=DATA_PACKAGES,
    package_data={
        "r2d2_hpc": ["py.typed"],
        "r2d2_hpc.conf": ["*.yaml", "*/*.yaml"],
        "r2d2_hpc.analysis.reference_csv": ["*.csv"],
    },
)
