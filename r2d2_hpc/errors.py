"""The small exception family of r2d2_hpc.

Every error raised on bad input is an ``R2D2Error``: it says which file or setting was wrong, what was found,
what was expected and how to fix it. They subclass ``ValueError`` so that callers that only know the standard
library can still catch them.
"""

from __future__ import annotations

from pathlib import Path


class R2D2Error(ValueError):
    """Base class of every error r2d2_hpc raises on purpose."""


class ConfigError(R2D2Error):
    """A configuration value is missing, out of range or inconsistent with another one."""


class DataError(R2D2Error):
    """A source dataset (NIfTI files, dataset.json, folders) is missing, malformed or inconsistent."""


class ShardError(R2D2Error):
    """A prepared shard set (HDF5 shards + manifest.json) is incomplete, corrupt or of an unknown version."""


class DiskError(R2D2Error):
    """A file could not be written: no space left, a quota, a read-only file system or no permission."""


class LaunchError(R2D2Error):
    """A job could not be submitted, or failed in a way the launcher can describe."""


def problem(path: str | Path | None, found: str, expected: str, fix: str) -> str:
    """Formats an error message the same way everywhere: file, what was found, what was expected, the fix."""
    where = f"{path}: " if path is not None else ""
    return f"{where}{found}; expected {expected}. Fix: {fix}"
